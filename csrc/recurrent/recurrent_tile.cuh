// Shared device code of the recurrent kernels.
//
// Design: one CTA per (sequence, head, 64-wide V tile). The CTA holds the float32 K x 64
// state tile in registers for the whole sequence, so a decode step reads and writes every
// state element exactly once (the memory floor) and needs no tensor cores: per token the
// update S = diag(exp g) S + k^T v and the output o = scale * q S are K x 64 FMAs each.
// Thread (kg, vq) owns R rows and the columns 4*vq .. 4*vq+3 of the tile. The rows and how
// tid maps to (kg, vq) follow the state layout, so that every state access is a float4 and
// a warp's accesses are contiguous: for [K, V] states the rows are k = kg + KG*i and lanes run
// along V (one float4 per row); for [V, K] states (state_v_first) the rows come in runs of
// four consecutive k (one float4 per column and run) and lanes run along K. Reductions (over k for o and dv, over v for dq, dk,
// dg) go through shared memory in a fixed order: results are deterministic.
// Token inputs (a few hundred bytes per token) are read in any dtype at run time, so there
// is one instantiation per K bound and state layout, not per dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gla_params.h"

namespace gla {
namespace recurrent {

constexpr int kBV = 64;  // V-tile width

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return __half2float(static_cast<const __half*>(p)[i]);
  }
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, float x, DType t) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = x; break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
    default: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
  }
}

template <int KMAX, int NT, bool VF>  // VF: [V, K] states (state_v_first)
struct Tile {
  static constexpr int CQ = kBV / 4;     // column quads per tile
  static constexpr int KG = NT / CQ;     // row groups
  static constexpr int R = KMAX / KG;    // rows per thread
  static constexpr bool kVF = VF;
  static_assert(NT % CQ == 0 && KMAX % KG == 0, "tile does not divide");

  static_assert(R % 4 == 0, "[V, K] states take rows in runs of four");

  int kg, vq;
  __device__ explicit Tile(int tid) : kg(VF ? tid % KG : tid / CQ), vq(VF ? tid / KG : tid % CQ) {}
  __device__ int k(int i) const { return VF ? 4 * (kg + KG * (i >> 2)) + (i & 3) : kg + KG * i; }
  __device__ int v(int j) const { return 4 * vq + j; }  // within the tile
};

// The (sequence, head) a CTA works on and where its tokens and states are.
struct Seq {
  int64_t bos;  // first token row (packed)
  int len;      // tokens
  bool skip;    // pooled decode: no state for this row
  const float* s_in;   // initial state of (n, h) or nullptr (zero)
  float* s_out;        // final state of (n, h) or nullptr
};

__device__ __forceinline__ Seq locate(const RecurrentParams& p, int n, int h) {
  Seq s;
  if (p.cu_seqlens != nullptr) {
    s.bos = p.cu_seqlens[n];
    s.len = p.cu_seqlens[n + 1] - p.cu_seqlens[n];
  } else {
    s.bos = int64_t(n) * p.T;
    s.len = p.T;
  }
  const int64_t state = (int64_t(n) * p.H + h) * p.K * p.V;
  s.skip = false;
  s.s_in = p.h0 != nullptr ? p.h0 + state : nullptr;
  s.s_out = p.ht != nullptr ? p.ht + state : nullptr;
  if (p.pool != nullptr) {
    const int64_t slot = p.index_int64 ? static_cast<const int64_t*>(p.index)[n]
                                       : static_cast<const int32_t*>(p.index)[n];
    s.skip = slot < 0 || slot >= p.P;
    float* at = p.pool + (s.skip ? 0 : (slot * p.H + h) * p.K * p.V);
    s.s_in = s.skip ? nullptr : at;
    s.s_out = s.skip ? nullptr : at;
  }
  return s;
}

// Loads this thread's part of the tile starting at column v0 (zeros outside K x V, or
// everywhere when base is nullptr).
template <class Tl>
__device__ __forceinline__ void load_state(float (&S)[Tl::R][4], const float* base, const Tl& tl,
                                           const RecurrentParams& p, int v0) {
  const int K = p.K, V = p.V;
  const int v = v0 + tl.v(0);
  if (!Tl::kVF && V % 4 == 0) {  // one aligned float4 per row
#pragma unroll
    for (int i = 0; i < Tl::R; ++i) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (base != nullptr && tl.k(i) < K && v < V)
        x = *reinterpret_cast<const float4*>(base + int64_t(tl.k(i)) * V + v);
      S[i][0] = x.x; S[i][1] = x.y; S[i][2] = x.z; S[i][3] = x.w;
    }
  } else if (Tl::kVF && K % 4 == 0) {  // one aligned float4 per run of four rows
#pragma unroll
    for (int i = 0; i < Tl::R; i += 4)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (base != nullptr && tl.k(i) < K && v + j < V)
          x = *reinterpret_cast<const float4*>(base + int64_t(v + j) * K + tl.k(i));
        S[i][j] = x.x; S[i + 1][j] = x.y; S[i + 2][j] = x.z; S[i + 3][j] = x.w;
      }
  } else {
#pragma unroll
    for (int i = 0; i < Tl::R; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = tl.k(i);
        const int64_t at = Tl::kVF ? int64_t(v + j) * K + k : int64_t(k) * V + v + j;
        S[i][j] = base != nullptr && k < K && v + j < V ? base[at] : 0.f;
      }
  }
}

template <class Tl>
__device__ __forceinline__ void store_state(const float (&S)[Tl::R][4], float* base, const Tl& tl,
                                            const RecurrentParams& p, int v0) {
  if (base == nullptr) return;
  const int K = p.K, V = p.V;
  const int v = v0 + tl.v(0);
  if (!Tl::kVF && V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < Tl::R; ++i)
      if (tl.k(i) < K && v < V)
        *reinterpret_cast<float4*>(base + int64_t(tl.k(i)) * V + v) =
            make_float4(S[i][0], S[i][1], S[i][2], S[i][3]);
  } else if (Tl::kVF && K % 4 == 0) {
#pragma unroll
    for (int i = 0; i < Tl::R; i += 4)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (tl.k(i) < K && v + j < V)
          *reinterpret_cast<float4*>(base + int64_t(v + j) * K + tl.k(i)) =
              make_float4(S[i][j], S[i + 1][j], S[i + 2][j], S[i + 3][j]);
  } else {
#pragma unroll
    for (int i = 0; i < Tl::R; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = tl.k(i);
        const int64_t at = Tl::kVF ? int64_t(v + j) * K + k : int64_t(k) * V + v + j;
        if (k < K && v + j < V) base[at] = S[i][j];
      }
  }
}

// S = diag(a) S + k^T v for this thread's elements (a, k over the tile's rows, v over its
// columns, all in shared memory as float).
template <class Tl>
__device__ __forceinline__ void step(float (&S)[Tl::R][4], const Tl& tl, const float* a,
                                     const float* k, const float* v) {
#pragma unroll
  for (int i = 0; i < Tl::R; ++i) {
    const float ai = a[tl.k(i)], ki = k[tl.k(i)];
#pragma unroll
    for (int j = 0; j < 4; ++j) S[i][j] = fmaf(ai, S[i][j], ki * v[tl.v(j)]);
  }
}

}  // namespace recurrent
}  // namespace gla
