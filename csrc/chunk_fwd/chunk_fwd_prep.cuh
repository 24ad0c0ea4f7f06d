// One chunk's prep, done by 256 threads: the in-chunk cumulative gate, the gated operands and the
// intra-chunk scores, for the producer warps of the Hopper fused kernel (chunk_fwd_fused_sm90.cu,
// results to the consumer's shared-memory stages): Sync is the barrier of those 256 threads, the
// sinks say where results go. The same steps as the two-stage forward's prep kernel
// (chunk_fwd_prep.cu), which should call this too, once a GPU run can check the move (its
// machine code changes; NOTES.md, run 10): it needs rows limited to the sequence and the Triton
// backward's exact-flag vote, which it alone uses. With b = log2(e) * the in-chunk
// cumulative sum of g, b_0 its first row and G its last:
//   qx = scale q exp2(b - b_0),  kd = k exp2(G - b),  A = scale * tril(q k^T gated)
// (chunk_fwd_scores.cuh: one reference row where the gates allow, the exact path otherwise).
// Where the chunk takes the one-reference scores, qx and kd come from the scores' gated operands
// (one pass, two exponentials per element, per-channel factors for the rest).
#pragma once

#include <cute/tensor.hpp>

#include "chunk_fwd_config.h"
#include "chunk_fwd_scores.cuh"
#include "device_common.cuh"

namespace gla {

// Eight floats of smem (32-byte aligned) into registers.
__device__ __forceinline__ void load8(const float* src, float* dst) {
  const float4 a = *reinterpret_cast<const float4*>(src), b = *reinterpret_cast<const float4*>(src + 4);
  dst[0] = a.x; dst[1] = a.y; dst[2] = a.z; dst[3] = a.w;
  dst[4] = b.x; dst[5] = b.y; dst[6] = b.z; dst[7] = b.w;
}

template <class T, class GT, int K, class Sync = CtaSync>
struct ChunkPrep {
  static constexpr int C = chunk_fwd_cfg::kChunk, NT = chunk_fwd_cfg::kThreads;
  static constexpr int LDQ = K + 8, LDB = K + 8, LDA = C + 8;
  static constexpr int TPC = NT / K, RPT = C / TPC;  // cumsum: threads per channel, rows each
  // smem: q, k [C][LDQ], b [C][LDB] float (raw g staged there first), A [C][LDA], partial sums
  static constexpr int kOffK = C * LDQ * 2, kOffB = 2 * kOffK, kOffA = kOffB + C * LDB * 4,
                       kOffTot = kOffA + C * LDA * 2, kSmem = kOffTot + NT * 4;
  static_assert(kSmem == chunk_fwd_cfg::prep_smem_bytes(K), "smem layout");
  static_assert(NT % K == 0 && RPT % 2 == 0 && NT % (K / 8) == 0, "K in {64, 128, 256}");
  using Scores = ChunkScores<T, K, LDQ, LDB, LDA>;

  struct Tiles {
    T *q, *k, *a;
    float *b, *tot;
    GT* g;
    __device__ explicit Tiles(unsigned char* smem)
        : q(reinterpret_cast<T*>(smem)), k(reinterpret_cast<T*>(smem + kOffK)), a(reinterpret_cast<T*>(smem + kOffA)),
          b(reinterpret_cast<float*>(smem + kOffB)), tot(reinterpret_cast<float*>(smem + kOffTot)),
          g(reinterpret_cast<GT*>(smem + kOffB)) {}
  };

  // cp.async of the chunk's q, k, g rows (at q + off, ..., row stride HK; rows at or past Lr
  // zero-filled), committed as one group.
  static __device__ __forceinline__ void load(const Tiles& s, const T* q, const T* k, const GT* g, int64_t HK, int Lr,
                                              int tid) {
    load_tile<NT, C, K>(s.q, LDQ, q, HK, Lr, tid);
    load_tile<NT, C, K>(s.k, LDQ, k, HK, Lr, tid);
    load_tile<NT, C, K>(s.g, K, g, HK, Lr, tid);
    cp_async_commit();
  }

  // b over the raw g (which must have landed and be visible), then a barrier; dec(ch, exp2(G),
  // b_0) once per channel. Returns whether the chunk takes the one-reference scores (a vote: a
  // barrier).
  template <class Dec>
  static __device__ __forceinline__ bool cumsum(const Tiles& s, int Lr, int tid, Dec&& dec) {
    float bmax = -INFINITY, bmin = INFINITY;  // this thread's rows of b (one channel)
    {
      const int ch = tid % K, part = tid / K;
      const float bz = float(s.g[ch]) * kLog2e;
      float gv[RPT];
      const float2 cs = chunk_cumsum<RPT, TPC>(s.g, K, ch, part, Lr, s.tot, K, gv, Sync{});  // then b may overwrite g
      CUTE_UNROLL
      for (int r = 0; r < RPT; ++r) {
        const float b = (gv[r] + cs.x) * kLog2e;
        s.b[(part * RPT + r) * LDB + ch] = b;
        bmax = fmaxf(bmax, b);
        bmin = fminf(bmin, b);
      }
      if (part == 0) dec(ch, cs.y * kLog2e, bz);
    }
    Sync::sync();
    return Scores::one_ref_ok(s.b, bmax, bmin, tid, Scores::kSpan2, Sync{});
  }

  // The gated operands, 8 channels (16 bytes) per thread and row: sink(t, cc, qx, kd) for
  // channels cc .. cc + 7 of every row t < C (rows past the sequence are zeros in q and k); then
  // the scores into s.a. Ends with a barrier: s.a complete, s.q, s.k and s.b free.
  template <class Sink>
  static __device__ __forceinline__ void operands_and_scores(const Tiles& s, bool one_ref, float scale, int tid,
                                                             Sink&& sink) {
    const int cc = (tid % (K / 8)) * 8;
    float b0[8], bg[8], br[8];  // rows 0, C - 1 (G: rows past the end add nothing) and C / 2 of b
    load8(s.b + cc, b0);
    load8(s.b + (C - 1) * LDB + cc, bg);
    load8(s.b + (C / 2) * LDB + cc, br);
    // body(t, q, k, b) for this thread's pieces of every row
    auto for_pieces = [&](auto&& body) {
      for (int i = tid; i < C * (K / 8); i += NT) {
        const int t = i / (K / 8);
        const uint4 qa = *reinterpret_cast<const uint4*>(s.q + t * LDQ + cc);
        const uint4 ka = *reinterpret_cast<const uint4*>(s.k + t * LDQ + cc);
        float b[8];
        load8(s.b + t * LDB + cc, b);
        body(t, reinterpret_cast<const T*>(&qa), reinterpret_cast<const T*>(&ka), b);
      }
    };
    if (one_ref) {
      // q~ = q exp2(b - b_r) and k~ = k exp2(b_r - b) over q and k for the scores' MMA;
      // qx = scale q~ exp2(b_r - b_0) and kd = k~ exp2(G - b_r) from the same products
      float fq[8], fk[8];
      CUTE_UNROLL
      for (int e = 0; e < 8; ++e) {
        fq[e] = scale * ex2(br[e] - b0[e]);
        fk[e] = ex2(bg[e] - br[e]);
      }
      for_pieces([&](int t, const T* qe, const T* ke, const float* b) {
        uint4 qt, kt, xo, yo;
        T *qte = reinterpret_cast<T*>(&qt), *kte = reinterpret_cast<T*>(&kt);
        T *xe = reinterpret_cast<T*>(&xo), *ye = reinterpret_cast<T*>(&yo);
        CUTE_UNROLL
        for (int e = 0; e < 8; ++e) {
          const float x = float(qe[e]) * ex2(b[e] - br[e]), y = float(ke[e]) * ex2(br[e] - b[e]);
          qte[e] = T(x);
          kte[e] = T(y);
          xe[e] = T(x * fq[e]);
          ye[e] = T(y * fk[e]);
        }
        *reinterpret_cast<uint4*>(s.q + t * LDQ + cc) = qt;
        *reinterpret_cast<uint4*>(s.k + t * LDQ + cc) = kt;
        sink(t, cc, xo, yo);
      });
      Sync::sync();
      Scores::one_ref_mma(s.q, s.k, s.a, scale, tid);
    } else {
      for_pieces([&](int t, const T* qe, const T* ke, const float* b) {
        uint4 xo, yo;
        T *xe = reinterpret_cast<T*>(&xo), *ye = reinterpret_cast<T*>(&yo);
        CUTE_UNROLL
        for (int e = 0; e < 8; ++e) {
          xe[e] = T(scale * float(qe[e]) * ex2(fminf(b[e] - b0[e], 0.f)));
          ye[e] = T(float(ke[e]) * ex2(bg[e] - b[e]));
        }
        sink(t, cc, xo, yo);
      });
      Scores::template exact<false>(s.q, s.k, s.b, nullptr, s.a, scale, tid);
    }
    Sync::sync();
  }

  // The scores' rows as 16-byte pieces: sink(t, s0, piece) for every row, zeros above the
  // diagonal blocks (the exact path leaves those unwritten).
  template <class Sink>
  static __device__ __forceinline__ void scores_out(const Tiles& s, int tid, Sink&& sink) {
    for (int i = tid; i < C * (C / 8); i += NT) {
      const int t = i / (C / 8), s0 = (i % (C / 8)) * 8;
      sink(t, s0, s0 / 16 > t / 16 ? make_uint4(0u, 0u, 0u, 0u) : *reinterpret_cast<const uint4*>(s.a + t * LDA + s0));
    }
  }
};

}  // namespace gla
