// Device helpers shared by the chunked kernels (csrc/chunk_fwd, csrc/chunk_bwd); torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#include "gla_params.h"

namespace gla {

constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 (flushes to 0 far below; never overflows).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Two floats rounded to T (16-bit) and packed into one 32-bit word.
template <class T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  T x[2] = {T(a), T(b)};
  uint32_t r;
  memcpy(&r, x, 4);
  return r;
}

// Tokens [bos, eos) of sequence n: from cu_seqlens, or batch row n of T tokens.
template <class Params>
__device__ __forceinline__ void sequence_bounds(const Params& p, int n, int64_t& bos, int64_t& eos) {
  if (p.cu_seqlens != nullptr) {
    bos = p.cu_seqlens[n];
    eos = p.cu_seqlens[n + 1];
  } else {
    bos = int64_t(n) * p.T;
    eos = bos + p.T;
  }
}

}  // namespace gla
