// Small device helpers of the chunked backward (torch-free).
#pragma once

#include <cstdint>
#include <cstring>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>

#include "cute_gemm.cuh"

#include "device_common.cuh"

namespace gla {
namespace chunk_bwd_detail {

template <class T> struct MmaAtomFor;
template <> struct MmaAtomFor<cute::bfloat16_t> { using type = cute::SM80_16x8x16_F32BF16BF16F32_TN; };

// 16-byte global->shared cp.async; with valid == false the 16 bytes are zero-filled and
// nothing is read (src must still be a valid address expression, it is not dereferenced).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// L2 prefetch of `rows` rows of `bytes` bytes (a multiple of 128) each, `stride` bytes apart.
template <int kThreads>
__device__ __forceinline__ void prefetch_rows(const void* base, int rows, int bytes, int64_t stride, int tid) {
  const int lines = bytes / 128;
  for (int i = tid; i < rows * lines; i += kThreads)
    prefetch_l2(static_cast<const char*>(base) + int64_t(i / lines) * stride + 128 * (i % lines));
}

// Copies `rows` rows of `width` elements (16-byte pieces) from global (row stride `gstride`
// elements) into shared (row stride `sstride`), zero-filling rows at or past `valid_rows`.
template <int kThreads, int kRows, int kWidth, class E>
__device__ __forceinline__ void load_tile(E* s, int sstride, const E* g, int64_t gstride, int valid_rows, int tid) {
  constexpr int P = 16 / int(sizeof(E));
  constexpr int PR = kWidth / P;
  for (int i = tid; i < kRows * PR; i += kThreads) {
    const int r = i / PR, cc = (i % PR) * P;
    const bool ok = r < valid_rows;
    cp_async16(s + r * sstride + cc, g + (ok ? int64_t(r) * gstride + cc : 0), ok);
  }
}

}  // namespace chunk_bwd_detail
}  // namespace gla
