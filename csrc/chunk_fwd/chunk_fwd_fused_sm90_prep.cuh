// One chunk's prep, done by 256 threads: the in-chunk cumulative gate, the gated operands and,
// on the exact path, the intra-chunk scores, for the producer warps of the Hopper fused kernel
// (chunk_fwd_fused_sm90.cu, results to the consumer's shared-memory stages): Sync is the barrier
// of those 256 threads, the sinks say where results go. With b = log2(e) * the in-chunk
// cumulative sum of g, b_0 its first row, b_r its row C / 2 and G its last:
//   qx = scale q exp2(b - b_0),  kd = k exp2(G - b),  A = scale * tril(q k^T gated)
// (chunk_fwd_scores.cuh: one reference row where the gates allow, the exact path otherwise).
// Where the chunk takes the one-reference scores, the prep gives q~ = q exp2(b - b_r) and
// k~ = k exp2(b_r - b) only: A = scale tril(q~ k~^T), qx = scale exp2(b_r - b_0) q~ and
// kd = exp2(G - b_r) k~, the consumer applying those per-channel factors to the state instead.
// The two-stage forward's prep kernel (chunk_fwd_twostage_prep.cu) does the same steps but keeps qx, kd
// and A in memory for its walk and the backward.
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

  // b over the raw g (which must have landed and be visible), then a barrier. Returns whether the
  // chunk takes the one-reference scores (a vote: a barrier, after which s.b is complete); with
  // `far`, also the Triton backward's flag (a second vote where the spans differ: float16).
  static __device__ __forceinline__ bool cumsum(const Tiles& s, int Lr, int tid, bool* far = nullptr) {
    float bmax = -INFINITY, bmin = INFINITY;  // this thread's rows of b (one channel)
    {
      const int ch = tid % K, part = tid / K;
      float gv[RPT];
      const float2 cs = chunk_cumsum<RPT, TPC>(s.g, K, ch, part, Lr, s.tot, K, gv, Sync{});  // then b may overwrite g
      CUTE_UNROLL
      for (int r = 0; r < RPT; ++r) {
        const float b = (gv[r] + cs.x) * kLog2e;
        s.b[(part * RPT + r) * LDB + ch] = b;
        bmax = fmaxf(bmax, b);
        bmin = fminf(bmin, b);
      }
    }
    Sync::sync();
    const bool one_ref = Scores::one_ref_ok(s.b, bmax, bmin, tid, Scores::kSpan2, Sync{});
    if (far != nullptr)
      *far = Scores::kSpan2 == Scores::kFlagSpan2 ? !one_ref
                                                  : !Scores::one_ref_ok(s.b, bmax, bmin, tid, Scores::kFlagSpan2, Sync{});
    return one_ref;
  }

  struct NoKeep {
    __device__ void operator()(int, int, uint4, uint4) const {}
  };

  // The chunk's operands, 8 channels (16 bytes) per thread and row: sink(t, cc, x, y) for
  // channels cc .. cc + 7 of every row t < C (rows past the sequence are zeros in q and k), with
  // b_r = b at row C / 2:
  //   one_ref: x = q~ = q exp2(b - b_r), y = k~ = k exp2(b_r - b)  (the scores are q~ k~^T, left
  //            to the caller, as are the per-channel factors that make qx and kd of them);
  //   exact:   x = qx, y = kd, and the scores into s.a.
  // keep(t, cc, qx, kd), where given (training), gets qx and kd on both paths (one_ref: from the
  // same products, qx = scale exp2(b_r - b_0) q~ and kd = exp2(G - b_r) k~ before rounding).
  // Ends with a barrier: s.a complete, s.q, s.k and s.b free.
  template <class Sink, class Keep = NoKeep>
  static __device__ __forceinline__ void operands(const Tiles& s, bool one_ref, float scale, int tid, Sink&& sink,
                                                  Keep&& keep = {}) {
    constexpr bool kKeep = !cute::is_same_v<cute::remove_cvref_t<Keep>, NoKeep>;
    const int cc = (tid % (K / 8)) * 8;
    float bref[8], bg[8];  // b_r (one_ref) or b_0 (exact); G = row C - 1 (rows past the end add nothing)
    load8(s.b + (one_ref ? C / 2 : 0) * LDB + cc, bref);
    load8(s.b + (C - 1) * LDB + cc, bg);
    float fq[8], fk[8];  // kept one_ref operands: qx = q~ fq, kd = k~ fk
    if (kKeep && one_ref) {
      load8(s.b + cc, fq);
      CUTE_UNROLL
      for (int e = 0; e < 8; ++e) {
        fq[e] = scale * ex2(bref[e] - fq[e]);
        fk[e] = ex2(bg[e] - bref[e]);
      }
    }
    auto pieces = [&](auto ref) {  // ref: one_ref, as a compile-time constant
      for (int i = tid; i < C * (K / 8); i += NT) {
        const int t = i / (K / 8);
        const uint4 qa = *reinterpret_cast<const uint4*>(s.q + t * LDQ + cc);
        const uint4 ka = *reinterpret_cast<const uint4*>(s.k + t * LDQ + cc);
        const T *qe = reinterpret_cast<const T*>(&qa), *ke = reinterpret_cast<const T*>(&ka);
        float b[8];
        load8(s.b + t * LDB + cc, b);
        uint4 xo, yo;
        [[maybe_unused]] uint4 qxo, kdo;  // kept one_ref operands
        T *xe = reinterpret_cast<T*>(&xo), *ye = reinterpret_cast<T*>(&yo);
        CUTE_UNROLL
        for (int e = 0; e < 8; ++e) {
          if constexpr (decltype(ref)::value) {
            const float x = float(qe[e]) * ex2(b[e] - bref[e]), y = float(ke[e]) * ex2(bref[e] - b[e]);
            xe[e] = T(x);
            ye[e] = T(y);
            if constexpr (kKeep) {
              reinterpret_cast<T*>(&qxo)[e] = T(x * fq[e]);
              reinterpret_cast<T*>(&kdo)[e] = T(y * fk[e]);
            }
          } else {
            xe[e] = T(scale * float(qe[e]) * ex2(fminf(b[e] - bref[e], 0.f)));
            ye[e] = T(float(ke[e]) * ex2(bg[e] - b[e]));
          }
        }
        sink(t, cc, xo, yo);
        if constexpr (kKeep) {
          if constexpr (decltype(ref)::value) keep(t, cc, qxo, kdo);
          else keep(t, cc, xo, yo);
        }
      }
    };
    if (one_ref) pieces(cute::true_type{});
    else pieces(cute::false_type{});
    if (!one_ref) Scores::template exact<false>(s.q, s.k, s.b, nullptr, s.a, scale, tid);
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
