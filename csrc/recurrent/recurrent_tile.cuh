// Shared device code of the recurrent kernels.
//
// Design: one CTA per (sequence, head, 64-wide V tile). The CTA holds the float32 K x 64
// state tile in registers for the whole sequence, so a decode step reads and writes every
// state element exactly once (the memory floor) and needs no tensor cores: per token the
// update S = diag(exp g) S + k^T v and the output o = scale * q S are K x 64 FMAs each.
// Thread (kg, vq) owns rows k = kg + KG*i (i < R) and columns 4*vq .. 4*vq+3 of the tile.
// How tid maps to (kg, vq) follows the state layout so that a warp's state accesses are
// contiguous: [K, V] states put lanes along V (one float4 per row), [V, K] states
// (state_v_first) put lanes along K. Reductions (over k for o and dv, over v for dq, dk,
// dg) go through shared memory in a fixed order: results are deterministic.
// Token inputs (a few hundred bytes per token) are read in any dtype at run time, so there
// is one instantiation per K bound, not per dtype.
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

template <int KMAX, int NT>
struct Tile {
  static constexpr int CQ = kBV / 4;     // column quads per tile
  static constexpr int KG = NT / CQ;     // row groups
  static constexpr int R = KMAX / KG;    // rows per thread
  static_assert(NT % CQ == 0 && KMAX % KG == 0, "tile does not divide");

  int kg, vq;
  __device__ Tile(int tid, bool v_first)
      : kg(v_first ? tid % KG : tid / CQ), vq(v_first ? tid / KG : tid % CQ) {}
  __device__ int k(int i) const { return kg + KG * i; }
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
template <int KMAX, int NT>
__device__ __forceinline__ void load_state(float (&S)[Tile<KMAX, NT>::R][4], const float* base,
                                           const Tile<KMAX, NT>& tl, const RecurrentParams& p,
                                           int v0) {
  const int K = p.K, V = p.V;
#pragma unroll
  for (int i = 0; i < Tile<KMAX, NT>::R; ++i) {
    const int k = tl.k(i);
    const int v = v0 + tl.v(0);
    const bool row = base != nullptr && k < K;
    if (!p.state_v_first && V % 4 == 0) {  // one aligned float4 per row
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row && v < V) x = *reinterpret_cast<const float4*>(base + int64_t(k) * V + v);
      S[i][0] = x.x; S[i][1] = x.y; S[i][2] = x.z; S[i][3] = x.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t at = p.state_v_first ? int64_t(v + j) * K + k : int64_t(k) * V + v + j;
        S[i][j] = row && v + j < V ? base[at] : 0.f;
      }
    }
  }
}

template <int KMAX, int NT>
__device__ __forceinline__ void store_state(const float (&S)[Tile<KMAX, NT>::R][4], float* base,
                                            const Tile<KMAX, NT>& tl, const RecurrentParams& p,
                                            int v0) {
  if (base == nullptr) return;
  const int K = p.K, V = p.V;
#pragma unroll
  for (int i = 0; i < Tile<KMAX, NT>::R; ++i) {
    const int k = tl.k(i);
    const int v = v0 + tl.v(0);
    if (k >= K) continue;
    if (!p.state_v_first && V % 4 == 0) {
      if (v < V)
        *reinterpret_cast<float4*>(base + int64_t(k) * V + v) =
            make_float4(S[i][0], S[i][1], S[i][2], S[i][3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t at = p.state_v_first ? int64_t(v + j) * K + k : int64_t(k) * V + v + j;
        if (v + j < V) base[at] = S[i][j];
      }
    }
  }
}

// S = diag(a) S + k^T v for this thread's elements (a, k over the tile's rows, v over its
// columns, all in shared memory as float).
template <int KMAX, int NT>
__device__ __forceinline__ void step(float (&S)[Tile<KMAX, NT>::R][4], const Tile<KMAX, NT>& tl,
                                     const float* a, const float* k, const float* v) {
#pragma unroll
  for (int i = 0; i < Tile<KMAX, NT>::R; ++i) {
    const float ai = a[tl.k(i)], ki = k[tl.k(i)];
#pragma unroll
    for (int j = 0; j < 4; ++j) S[i][j] = fmaf(ai, S[i][j], ki * v[tl.v(j)]);
  }
}

}  // namespace recurrent
}  // namespace gla
