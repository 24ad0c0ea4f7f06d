// Intra-chunk scores of one 64-token chunk, A = scale * tril(q k^T gated), into shared memory:
// used by the fused forward (chunk_fwd_fused_sm80.cuh) and by the prep kernel of the two-stage
// forward (chunk_fwd_twostage_prep.cu). 256 threads; q, k in the input dtype ([C][LDQ]), b = log2(e) *
// the in-chunk cumulative sum of g (float32, [C][LDB]), A in the input dtype ([C][LDA]).
//
// one_ref: where every |b_t - b_r| <= kSpan2 (r = 32, the middle row), one MMA of
//   q~ = q exp2(b - b_r) and k~ = k exp2(b_r - b) (factors up to exp(40) for bf16, exp(4) for
//   fp16, whose max is 65504).
// exact: for stronger gates,
//   - the 16 x 16 sub-blocks below the diagonal (query block i > key block j) by MMA on
//     operands built in registers with reference row r = 16 i: q~ = q exp2(b_t - b_r),
//     k~ = k exp2(b_r - b_s), every factor <= 1;
//   - the 4 diagonal sub-blocks element-wise in float32; the weight exp2(b_t - b_s) is a
//     running product of the per-step factors e_t = exp2(b_t - b_{t-1}) (kHasE: e in smem,
//     no exp, every factor <= 1) or exp2(b_t - b_s) itself.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>

#include "cute_gemm.cuh"
#include "device_common.cuh"

namespace gla {

template <class T>
__device__ __forceinline__ float2 load_pair(const T* ptr) {
  const uint32_t u = *reinterpret_cast<const uint32_t*>(ptr);
  T x[2];
  memcpy(x, &u, 4);
  return make_float2(float(x[0]), float(x[1]));
}

template <class T, int K, int LDQ, int LDB, int LDA>
struct ChunkScores {
  static constexpr int C = 64, NT = 256;
  static constexpr int NCH = K / 64;  // 8-channel pieces per lane in the diagonal blocks
  // span of the one-reference path (log2 units): bf16 keeps float32's exponent range
  static constexpr float kSpan2 = (cute::is_same_v<T, cute::half_t> ? 4.f : 40.f) * kLog2e;
  // the Triton backward's exact-path flag (FwdParams::save_flags): some |b_t - b_r| > 40 nats
  static constexpr float kFlagSpan2 = 40.f * kLog2e;

  using Atom = cute::MMA_Atom<typename MmaAtomFor<T>::type>;
  // 64 x 64 scores: 4 warps along the queries, 2 along the keys
  using Mma64 = decltype(cute::make_tiled_mma(Atom{}, cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>{},
                                              cute::Tile<cute::_64, cute::_32, cute::_16>{}));
  // one warp, one 16 x 16 sub-block
  using MmaS = decltype(cute::make_tiled_mma(Atom{}, cute::Layout<cute::Shape<cute::_1, cute::_1, cute::_1>>{},
                                             cute::Tile<cute::_16, cute::_16, cute::_16>{}));

  // Whether the chunk may take one_ref: bmax/bmin are this thread's extremes of b in channel
  // tid % K. A vote of the 256 threads (a barrier: the CTA's, or Sync's group); sB must be complete.
  template <class Sync = CtaSync>
  static __device__ __forceinline__ bool one_ref_ok(const float* sB, float bmax, float bmin, int tid,
                                                    float span2 = kSpan2, Sync = {}) {
    const float br = sB[(C / 2) * LDB + tid % K];
    return !Sync::any(bmax - br > span2 || br - bmin > span2);
  }

  // q~ into sQt (which may be sQ itself), k~ over sK; then the MMA. Ends with sA written (no barrier).
  static __device__ __forceinline__ void one_ref(const T* sQ, T* sQt, T* sK, const float* sB, T* sA, float scale,
                                                 int tid) {
    using namespace cute;
    const float* sBr = sB + (C / 2) * LDB;
    for (int i = tid; i < C * K / 2; i += NT) {
      const int t = i / (K / 2), cc = (i % (K / 2)) * 2;
      const float2 b = *reinterpret_cast<const float2*>(sB + t * LDB + cc);
      const float2 r = *reinterpret_cast<const float2*>(sBr + cc);
      const float2 x = load_pair(sQ + t * LDQ + cc);
      const float2 y = load_pair(sK + t * LDQ + cc);
      *reinterpret_cast<uint32_t*>(sQt + t * LDQ + cc) = pack2<T>(x.x * ex2(b.x - r.x), x.y * ex2(b.y - r.y));
      *reinterpret_cast<uint32_t*>(sK + t * LDQ + cc) = pack2<T>(y.x * ex2(r.x - b.x), y.y * ex2(r.y - b.y));
    }
    __syncthreads();
    one_ref_mma(sQt, sK, sA, scale, tid);
  }

  // The MMA of one_ref on q~ (sQt) and k~ (sK), complete in smem. Ends with sA written (no barrier).
  static __device__ __forceinline__ void one_ref_mma(const T* sQt, const T* sK, T* sA, float scale, int tid) {
    using namespace cute;
    Mma64 mma;
    auto thr = mma.get_thread_slice(tid);
    auto lqk = make_layout(Shape<Int<C>, Int<K>>{}, make_stride(Int<LDQ>{}, _1{}));
    Tensor acc = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});
    clear(acc);
    gemm_smem<SM75_U32x4_LDSM_N, SM75_U32x4_LDSM_N, T>(mma, make_tensor(make_smem_ptr(sQt), lqk),
                                                      make_tensor(make_smem_ptr(sK), lqk), acc, tid);
    Tensor tC = thr.partition_C(make_tensor(make_smem_ptr(sA),
                                            make_layout(Shape<Int<C>, Int<C>>{}, make_stride(Int<LDA>{}, _1{}))));
    Tensor tCc = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int t = get<0>(tCc(i)), s0 = get<1>(tCc(i));  // columns s0, s0 + 1
      *reinterpret_cast<uint32_t*>(&tC(i)) =
          pack2<T>(s0 <= t ? acc(i) * scale : 0.f, s0 + 1 <= t ? acc(i + 1) * scale : 0.f);
    }
  }

  // The exact path. With kHasE, sE ([C][LDB] float) receives the factors e first. Writes the
  // blocks on and below the diagonal (zeros above the diagonal inside the diagonal blocks; the
  // blocks above it are not written). Ends without a barrier.
  template <bool kHasE>
  static __device__ __forceinline__ void exact(const T* sQ, const T* sK, const float* sB, float* sE, T* sA,
                                               float scale, int tid) {
    using namespace cute;
    const int warp = tid / 32, lane = tid % 32;
    if constexpr (kHasE) {  // e_t = exp(b_t - b_{t-1}) <= 1 (e_0 is never read)
      for (int i = tid; i < (C - 1) * K; i += NT) {
        const int t = 1 + i / K, ch = i % K;
        sE[t * LDB + ch] = ex2(sB[t * LDB + ch] - sB[(t - 1) * LDB + ch]);
      }
      __syncthreads();
    }
    // Diagonal 16 x 16 sub-blocks, element-wise in float32. Warp pair (2d, 2d+1) owns
    // block d; a group of 8 lanes owns query rows ta and 15 - ta (17 pairs s <= t in all),
    // each lane NCH pieces of 8 channels; the group reduces with shuffles. For each row
    // the keys are walked from s = t down to 0 with w = exp(b_t - b_s) per channel, kept
    // as a running product of the per-step factors e, or, where e is not stored, as
    // exp2(b_t - b_s) directly.
    const int d = warp >> 1, gq = lane >> 3, li = lane & 7;
    const int ta = (warp & 1) * 4 + gq, tb = 15 - ta;
    // qf: q_t (ex2 path only); w: q_t * exp(b_t - b_s) per channel (running product path)
    float qf[kHasE ? 1 : NCH * 8], w[kHasE ? NCH * 8 : 1], bt[kHasE ? 1 : NCH * 8];
    // partial dot product of pair pp over this lane's channels
    auto pair_dot = [&](const int pp) -> float {
      const bool first = pp == 0 || pp == ta + 1;
      const int t = pp <= ta ? ta : tb;
      const int s = pp <= ta ? ta - pp : tb - (pp - ta - 1);
      const int rt = 16 * d + t, rs = 16 * d + s;
      if (first) {
        CUTE_UNROLL
        for (int m = 0; m < NCH; ++m) {
          const int cc = (li + 8 * m) * 8;
          const uint4 qa = *reinterpret_cast<const uint4*>(sQ + rt * LDQ + cc);
          const T* qe = reinterpret_cast<const T*>(&qa);
          if constexpr (kHasE) {
            CUTE_UNROLL
            for (int e = 0; e < 8; ++e) w[m * 8 + e] = float(qe[e]);
          } else {
            CUTE_UNROLL
            for (int e = 0; e < 8; ++e) qf[m * 8 + e] = float(qe[e]);
            const float4 b0 = *reinterpret_cast<const float4*>(sB + rt * LDB + cc);
            const float4 b1 = *reinterpret_cast<const float4*>(sB + rt * LDB + cc + 4);
            bt[m * 8 + 0] = b0.x; bt[m * 8 + 1] = b0.y; bt[m * 8 + 2] = b0.z; bt[m * 8 + 3] = b0.w;
            bt[m * 8 + 4] = b1.x; bt[m * 8 + 5] = b1.y; bt[m * 8 + 6] = b1.z; bt[m * 8 + 7] = b1.w;
          }
        }
      }
      float acc = 0.f;
      CUTE_UNROLL
      for (int m = 0; m < NCH; ++m) {
        const int cc = (li + 8 * m) * 8;
        const uint4 ka = *reinterpret_cast<const uint4*>(sK + rs * LDQ + cc);
        const T* ke = reinterpret_cast<const T*>(&ka);
        if constexpr (kHasE) {
          // w(t, s) = w(t, s + 1) * e_{s+1}, w(t, t) = q_t; the e row is clamped when unused
          const int re = first ? rs : rs + 1;
          const float4 e0 = *reinterpret_cast<const float4*>(sE + re * LDB + cc);
          const float4 e1 = *reinterpret_cast<const float4*>(sE + re * LDB + cc + 4);
          const float ev[8] = {e0.x, e0.y, e0.z, e0.w, e1.x, e1.y, e1.z, e1.w};
          CUTE_UNROLL
          for (int e = 0; e < 8; ++e) {
            if (!first) w[m * 8 + e] *= ev[e];
            acc += w[m * 8 + e] * float(ke[e]);
          }
        } else {
          const float4 b0 = *reinterpret_cast<const float4*>(sB + rs * LDB + cc);
          const float4 b1 = *reinterpret_cast<const float4*>(sB + rs * LDB + cc + 4);
          const float bs[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
          CUTE_UNROLL
          for (int e = 0; e < 8; ++e) acc += qf[m * 8 + e] * ex2(bt[m * 8 + e] - bs[e]) * float(ke[e]);
        }
      }
      return acc;
    };
    auto group_sum = [&](float acc) {
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      acc += __shfl_xor_sync(0xffffffffu, acc, 4);
      return acc;
    };
    auto pair_row = [&](int pp) { return pp <= ta ? ta : tb; };
    auto pair_col = [&](int pp) { return pp <= ta ? ta - pp : tb - (pp - ta - 1); };
    if constexpr (kHasE && K == 128) {
      // unrolled walk, reductions after it so that the shuffles of all pairs overlap
      // (K = 64 runs two CTAs per SM and has no registers for this)
      float accs[17];
      CUTE_UNROLL
      for (int pp = 0; pp < 17; ++pp) accs[pp] = pair_dot(pp);
      CUTE_UNROLL
      for (int pp = 0; pp < 17; ++pp) {
        const float acc = group_sum(accs[pp]);
        if (li == (pp & 7)) sA[(16 * d + pair_row(pp)) * LDA + 16 * d + pair_col(pp)] = T(acc * scale);
      }
    } else {
#pragma unroll 1
      for (int pp = 0; pp < 17; ++pp) {
        const float acc = group_sum(pair_dot(pp));
        if (li == 0) sA[(16 * d + pair_row(pp)) * LDA + 16 * d + pair_col(pp)] = T(acc * scale);
      }
    }
    for (int s = ta + 1 + li; s < 16; s += 8) sA[(16 * d + ta) * LDA + 16 * d + s] = T(0.f);
    for (int s = tb + 1 + li; s < 16; s += 8) sA[(16 * d + tb) * LDA + 16 * d + s] = T(0.f);

    // Sub-blocks below the diagonal: warp w < 6 owns block (bi, bj).
    if (warp < 6) {
      const int bi = warp < 1 ? 1 : (warp < 3 ? 2 : 3);
      const int bj = warp < 1 ? 0 : (warp < 3 ? warp - 1 : warp - 3);
      MmaS mmaS;
      auto thr = mmaS.get_thread_slice(lane);
      auto lq = make_layout(Shape<_16, Int<K>>{}, make_stride(Int<LDQ>{}, _1{}));
      auto lb = make_layout(Shape<_16, Int<K>>{}, make_stride(Int<LDB>{}, _1{}));
      auto lr = make_layout(Shape<_16, Int<K>>{}, make_stride(_0{}, _1{}));  // row r broadcast
      Tensor sQi = make_tensor(make_smem_ptr(sQ + 16 * bi * LDQ), lq);
      Tensor sBi = make_tensor(make_smem_ptr(sB + 16 * bi * LDB), lb);
      Tensor sBr = make_tensor(make_smem_ptr(sB + 16 * bi * LDB), lr);
      Tensor sKj = make_tensor(make_smem_ptr(sK + 16 * bj * LDQ), lq);
      Tensor sBj = make_tensor(make_smem_ptr(sB + 16 * bj * LDB), lb);
      Tensor tAq = thr.partition_A(sQi);
      Tensor tAb = thr.partition_A(sBi);
      Tensor tAr = thr.partition_A(sBr);
      Tensor tBk = thr.partition_B(sKj);
      Tensor tBb = thr.partition_B(sBj);
      Tensor tBr = thr.partition_B(sBr);
      Tensor rA = thr.partition_fragment_A(sQi);
      Tensor rB = thr.partition_fragment_B(sKj);
      Tensor acc = partition_fragment_C(mmaS, Shape<_16, _16>{});
      clear(acc);
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(rA); ++kk) {
        // fragment values (i, i+1) are adjacent channels: 32-bit / 64-bit smem loads
        CUTE_UNROLL
        for (int i = 0; i < size<0>(rA); i += 2) {
          const float2 x = load_pair(&tAq(i, 0, kk));
          const float2 b = *reinterpret_cast<const float2*>(&tAb(i, 0, kk));
          const float2 r = *reinterpret_cast<const float2*>(&tAr(i, 0, kk));
          rA(i, 0, kk) = T(x.x * ex2(b.x - r.x));
          rA(i + 1, 0, kk) = T(x.y * ex2(b.y - r.y));
        }
        CUTE_UNROLL
        for (int nn = 0; nn < size<1>(rB); ++nn)
          CUTE_UNROLL
          for (int i = 0; i < size<0>(rB); i += 2) {
            const float2 x = load_pair(&tBk(i, nn, kk));
            const float2 b = *reinterpret_cast<const float2*>(&tBb(i, nn, kk));
            const float2 r = *reinterpret_cast<const float2*>(&tBr(i, nn, kk));
            rB(i, nn, kk) = T(x.x * ex2(r.x - b.x));
            rB(i + 1, nn, kk) = T(x.y * ex2(r.y - b.y));
          }
        gemm(mmaS, acc, rA(_, _, kk), rB(_, _, kk), acc);
      }
      Tensor sAij = make_tensor(make_smem_ptr(sA + 16 * bi * LDA + 16 * bj),
                                make_layout(Shape<_16, _16>{}, make_stride(Int<LDA>{}, _1{})));
      Tensor tC = thr.partition_C(sAij);
      CUTE_UNROLL
      for (int i = 0; i < size(acc); i += 2)
        *reinterpret_cast<uint32_t*>(&tC(i)) = pack2<T>(acc(i) * scale, acc(i + 1) * scale);
    }
  }
};

}  // namespace gla
