// Fused chunked GLA forward: main loop.
//
// K <= 128 (K = 256 runs the two-stage forward, chunk_fwd_twostage_prep.cu and chunk_fwd_twostage_walk_sm{80,90}.cu).
// One CTA (8 warps) per (sequence, head, V-tile of BV columns). The CTA walks the
// sequence in chunks of C = 64 tokens and keeps the K x BV state S in float32
// registers (MMA accumulator layout) the whole time; nothing but o and the final
// state goes back to device memory. Per chunk (b = log2(e) * inclusive cumsum of g
// inside the chunk, G = b of the last row, every exp2 argument below is <= 0):
//
//   load    q, k, g (K wide) and v (BV wide) with cp.async (16-byte pieces) into smem;
//           rows past the sequence end are clamped copies and masked below.
//   prep    per channel: b (float32, smem), exp(G) (smem), kg^T = (k * exp2(G - b))^T
//           (smem, input dtype, the A operand of the state update); in the exact path
//           below, the per-step factors e_t = exp2(b_t - b_{t-1}) (float32, smem).
//   scores  A = scale * tril(q k^T gated), 64 x 64, written to smem in the input dtype
//           (chunk_fwd_scores.cuh): one MMA with one reference row where every
//           |b_t - b_32| <= kSpan2 (a CTA-wide vote per chunk), else the exact path (MMA on
//           the sub-diagonal blocks, the diagonal ones element-wise with the factors e).
//   output  o = (scale * q * exp2(b)) S + A v   (two MMAs into one accumulator; the
//           gated q is built in registers; S comes from smem in the input dtype).
//   update  S = exp2(G) * S + kg^T v            (MMA into the register-resident state),
//           then S is written to smem (input dtype) for the next chunk's output MMA.
//
// Segment splitting (chunk_fwd_config.h, Split): blockIdx.z is the segment, whose initial
// state composes the end states that pass 1 (chunk_fwd_segment_pass.cu) stored.
//
// MMAs: SM80_16x8x16_F32{BF16,F16}{BF16,F16}F32_TN; smem->register copies with
// ldmatrix (SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T for v); global->smem with cp.async
// (cp.async.cg, device_common.cuh). The next chunk is prefetched into L2 at the top of
// each chunk, and its cp.async loads are issued as soon as the buffers they overwrite
// are no longer read: v (double-buffered) at the top of the chunk, k after
// the scores, q and g after the output.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/copy_sm80.hpp>

#include "cute_gemm.cuh"
#include "device_common.cuh"
#include "gla_params.h"
#include "chunk_fwd_config.h"
#include "chunk_fwd_scores.cuh"
#include "chunk_fwd_state.cuh"

namespace gla {
namespace chunk_fwd_detail {

using namespace cute;

template <class T_, class GT_, int K_, int BV_, bool kSave = false, int kPool = chunk_fwd_cfg::kNoPool>
struct Kernel {
  using T = T_;
  using GT = GT_;
  static constexpr int K = K_;
  static constexpr int BV = BV_;
  static constexpr int C = chunk_fwd_cfg::kChunk;
  static constexpr int NT = chunk_fwd_cfg::kThreads;
  static constexpr chunk_fwd_cfg::Smem L{K, BV};
  static constexpr int LDQ = L.ldq(), LDB = L.ldb(), LDV = L.ldv(), LDKT = L.ldkt(),
                       LDA = L.lda(), LDS = L.lds(), TPC = L.tpc(), RPT = C / TPC;
  static constexpr int kSmem = L.bytes();
  using Scores = ChunkScores<T, K, LDQ, LDB, LDA>;
  static_assert(C == 64 && NT == 256, "warp roles assume 8 warps and 64-token chunks");
  static_assert((K == 64 || K == 128) && RPT % 2 == 0, "K in {64, 128}");
  static_assert(BV % 64 == 0, "BV multiple of 64");

  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  // Output tile 64 x BV: 4 warps along the chunk (warp w%4 owns query rows 16*(w%4)..),
  // 2 along V.
  using MmaO = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));
  // State tile K x BV.
  using MmaU = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));

  static __device__ void run(const FwdParams& p, const chunk_fwd_cfg::Split& sp, unsigned char* smem) {
    T* sQ = reinterpret_cast<T*>(smem + L.off_q());
    T* sK = reinterpret_cast<T*>(smem + L.off_k());
    T* const sV0 = reinterpret_cast<T*>(smem + L.off_v());
    float* sB = reinterpret_cast<float*>(smem + L.off_b());
    GT* sG = reinterpret_cast<GT*>(smem + L.off_b());  // raw g staged in the b buffer
    T* sKT = reinterpret_cast<T*>(smem + L.off_kt());
    T* sA = reinterpret_cast<T*>(smem + L.off_a());
    T* sS = reinterpret_cast<T*>(smem + L.off_st());
    float* sGam = reinterpret_cast<float*>(smem + L.off_gam());
    float* sTot = reinterpret_cast<float*>(smem + L.off_tot());
    float* sE = reinterpret_cast<float*>(smem + L.off_e());

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H, vt = blockIdx.y;
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    int64_t len = eos > bos ? eos - bos : 0;
    // this CTA's segment of the sequence
    const int seg = blockIdx.z;
    const int last_seg = clip_to_segment(sp, seg, bos, len);
    if (last_seg < 0) return;
    if (kPool != chunk_fwd_cfg::kNoPool && padded_sequence(p, n)) {  // pooled call: zeros out, no slot touched
      zero_output<T, BV>(p, h, vt, bos, len);
      return;
    }
    const int nchunks = int((len + C - 1) / C);
    const int64_t HK = int64_t(p.H) * K, HV = int64_t(p.H) * p.V;
    const T* qb = static_cast<const T*>(p.q) + bos * HK + int64_t(h) * K;
    const T* kb = static_cast<const T*>(p.k) + bos * HK + int64_t(h) * K;
    const GT* gb = static_cast<const GT*>(p.g) + bos * HK + int64_t(h) * K;
    const T* vb = static_cast<const T*>(p.v) + bos * HV + int64_t(h) * p.V + vt * BV;
    T* ob = static_cast<T*>(p.o) + bos * HV + int64_t(h) * p.V + vt * BV;
    const float scale = p.scale;
    // training: the backward's intermediates (FwdParams::save_*, intermediates.h); V tile 0 writes
    // the per-token ones, the decays and the flags, every V tile its columns of the states
    const bool save_tok = kSave && vt == 0;
    const int64_t slot0 = kSave ? p.chunk_off[n] + (sp.seg_len > 0 ? int64_t(seg) * (sp.seg_len / C) : 0) : 0;
    T* const qxb = kSave ? static_cast<T*>(p.save_qx) + bos * HK + int64_t(h) * K : nullptr;
    T* const kdb = kSave ? static_cast<T*>(p.save_kd) + bos * HK + int64_t(h) * K : nullptr;

    auto rows_in = [&](int c) { return int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C); };

    // ---- global -> shared (cp.async, 16-byte pieces; rows past the end clamp to the last row)
    auto load_k = [&](int c) {
      const int64_t t0 = int64_t(c) * C;
      const int Lr = rows_in(c);
      constexpr int PQ = K / 8;
      for (int i = tid; i < C * PQ; i += NT) {
        const int r = i / PQ, cc = (i % PQ) * 8;
        cp_async16(sK + r * LDQ + cc, kb + (t0 + (r < Lr ? r : Lr - 1)) * HK + cc);
      }
    };
    auto load_qg = [&](int c) {
      const int64_t t0 = int64_t(c) * C;
      const int Lr = rows_in(c);
      constexpr int PQ = K / 8;
      for (int i = tid; i < C * PQ; i += NT) {
        const int r = i / PQ, cc = (i % PQ) * 8;
        cp_async16(sQ + r * LDQ + cc, qb + (t0 + (r < Lr ? r : Lr - 1)) * HK + cc);
      }
      constexpr int GP = 16 / int(sizeof(GT));
      constexpr int PG = K / GP;
      for (int i = tid; i < C * PG; i += NT) {
        const int r = i / PG, cc = (i % PG) * GP;
        cp_async16(sG + r * K + cc, gb + (t0 + (r < Lr ? r : Lr - 1)) * HK + cc);
      }
    };
    auto load_v = [&](int c) {
      T* sV = sV0 + (c % 2) * (C * LDV);
      const int64_t t0 = int64_t(c) * C;
      const int Lr = rows_in(c);
      constexpr int PV = BV / 8;
      for (int i = tid; i < C * PV; i += NT) {
        const int r = i / PV, cc = (i % PV) * 8;
        cp_async16(sV + r * LDV + cc, vb + (t0 + (r < Lr ? r : Lr - 1)) * HV + cc);
      }
    };
    auto prefetch_chunk = [&](int c) {
      const int64_t t0 = int64_t(c) * C;
      const int Lr = rows_in(c);
      constexpr int LQ = K * 2 / 128, LG = K * int(sizeof(GT)) / 128, LV = BV * 2 / 128;
      constexpr int per_row = 2 * LQ + LG + LV;
      for (int i = tid; i < Lr * per_row; i += NT) {
        const int r = i / per_row, j = i % per_row;
        const int64_t t = t0 + r;
        const char* ptr;
        if (j < LQ) ptr = reinterpret_cast<const char*>(qb + t * HK) + 128 * j;
        else if (j < 2 * LQ) ptr = reinterpret_cast<const char*>(kb + t * HK) + 128 * (j - LQ);
        else if (j < 2 * LQ + LG) ptr = reinterpret_cast<const char*>(gb + t * HK) + 128 * (j - 2 * LQ);
        else ptr = reinterpret_cast<const char*>(vb + t * HV) + 128 * (j - 2 * LQ - LG);
        prefetch_l2(ptr);
      }
    };

    // ---- the state, float32 in registers
    MmaU mmaU;
    auto thrU = mmaU.get_thread_slice(tid);
    Tensor rS = partition_fragment_C(mmaU, Shape<Int<K>, Int<BV>>{});
    Tensor tUc = thrU.partition_C(make_identity_tensor(Shape<Int<K>, Int<BV>>{}));
    // S in smem (input dtype), (K, BV) row-major: the pairs of columns a thread holds are adjacent
    Tensor sSkv = make_tensor(make_smem_ptr(sS),
                              make_layout(Shape<Int<K>, Int<BV>>{}, make_stride(Int<LDS>{}, _1{})));
    Tensor tUsS = thrU.partition_C(sSkv);
    load_initial_state<K, BV, false, kPool != chunk_fwd_cfg::kNoPool>(p, sp, n, h, vt, seg, rS, tUc);
    CheckpointCursor ckpt(p);
    CUTE_UNROLL
    for (int i = 0; i < size(rS); i += 2) *reinterpret_cast<uint32_t*>(&tUsS(i)) = pack2<T>(rS(i), rS(i + 1));

    if (nchunks > 0) {
      load_k(0);
      load_qg(0);
      load_v(0);
      cp_async_commit();
    }

    for (int c = 0; c < nchunks; ++c) {
      const int Lr = rows_in(c);
      T* const sV = sV0 + (c % 2) * (C * LDV);
      cp_async_wait<0>();
      __syncthreads();
      if (c + 1 < nchunks) {
        prefetch_chunk(c + 1);
        load_v(c + 1);  // the other v buffer was last read in chunk c - 1
        cp_async_commit();
      }

      if constexpr (kSave)  // the state entering this chunk
        store_state<T>(static_cast<typename KeptState<T>::type*>(p.save_h) + ((slot0 + c) * p.H + h) * K * p.V + vt * BV,
                       p.V, rS, tUc);
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV>(p, n, h, vt, int64_t(c) * C, rS, tUc);

      // ---------------- prep: cumsum of g per channel, exp(G), kg^T ----------------
      float bmax = -INFINITY, bmin = INFINITY;  // this thread's rows of b (one channel)
      {
        const int ch = tid % K, seg = tid / K;
        const float bz = clamp_gate(float(sG[ch])) * kLog2e;  // b_0 (kept operands only)
        float gv[RPT];
        const float2 cs = chunk_cumsum<RPT, TPC>(sG, K, ch, seg, Lr, sTot, K, gv);  // then b may overwrite g
        const float off = cs.x, gam = cs.y;
        const float gam2 = gam * kLog2e;
        if (seg == 0) sGam[ch] = ex2(gam2);
        if (save_tok && seg == 0) {
          float* dec = p.save_decay + ((slot0 + c) * p.H + h) * 3 * K + ch;
          dec[0] = ex2(gam2);
          dec[K] = ex2(gam2 - bz);
          dec[2 * K] = ex2(bz);
        }
        CUTE_UNROLL
        for (int r = 0; r < RPT; r += 2) {
          const int t = seg * RPT + r;
          const float b0 = (gv[r] + off) * kLog2e, b1 = (gv[r + 1] + off) * kLog2e;
          bmax = fmaxf(bmax, fmaxf(b0, b1));
          bmin = fminf(bmin, fminf(b0, b1));
          sB[t * LDB + ch] = b0;
          sB[(t + 1) * LDB + ch] = b1;
          const float k0 = t < Lr ? float(sK[t * LDQ + ch]) * ex2(gam2 - b0) : 0.f;
          const float k1 = t + 1 < Lr ? float(sK[(t + 1) * LDQ + ch]) * ex2(gam2 - b1) : 0.f;
          *reinterpret_cast<uint32_t*>(sKT + ch * LDKT + t) = pack2<T>(k0, k1);
          if (save_tok) {  // k exp(Gamma - b) and scale q exp(b - b_0), rows of the sequence
            const int64_t r0 = (int64_t(c) * C + t) * HK + ch;
            if (t < Lr) {
              kdb[r0] = T(k0);
              qxb[r0] = T(scale * float(sQ[t * LDQ + ch]) * ex2(fminf(b0 - bz, 0.f)));
            }
            if (t + 1 < Lr) {
              kdb[r0 + HK] = T(k1);
              qxb[r0 + HK] = T(scale * float(sQ[(t + 1) * LDQ + ch]) * ex2(fminf(b1 - bz, 0.f)));
            }
          }
        }
      }
      __syncthreads();
      // one reference row for this chunk if every |b_t - b_r| <= kSpan2 (uniform per CTA)
      const bool one_ref = Scores::one_ref_ok(sB, bmax, bmin, tid);
      if constexpr (kSave) {  // the Triton backward's exact flag
        bool far;
        if constexpr (Scores::kSpan2 == Scores::kFlagSpan2) far = !one_ref;
        else far = !Scores::one_ref_ok(sB, bmax, bmin, tid, Scores::kFlagSpan2);
        if (save_tok && tid == 0) p.save_flags[(slot0 + c) * p.H + h] = int8_t(far);
      }

      {
      // ---------------- intra-chunk scores -> sA ----------------
      if (one_ref) Scores::one_ref(sQ, reinterpret_cast<T*>(sE), sK, sB, sA, scale, tid);
      else Scores::template exact<true>(sQ, sK, sB, sE, sA, scale, tid);
      __syncthreads();
      if (save_tok) {  // the scores of the rows in the sequence; zeros above the diagonal
        // blocks (the exact path leaves those unwritten: the output never reads them)
        T* ab = static_cast<T*>(p.save_a) + ((bos + int64_t(c) * C) * p.H + h) * C;
        for (int i = tid; i < C * C / 8; i += NT) {
          const int t = i / (C / 8), s0 = (i % (C / 8)) * 8;
          if (t >= Lr) continue;
          const uint4 x = s0 / 16 > t / 16 ? make_uint4(0u, 0u, 0u, 0u)
                                          : *reinterpret_cast<const uint4*>(sA + t * LDA + s0);
          *reinterpret_cast<uint4*>(ab + int64_t(t) * p.H * C + s0) = x;
        }
      }

      if (c + 1 < nchunks) {  // k is read by prep and the scores only
        load_k(c + 1);
        cp_async_commit();
      }

      // ---------------- output: o = (scale q exp2(b)) S + A v ----------------
      {
        MmaO mmaO;
        auto thr = mmaO.get_thread_slice(tid);
        Tensor sQf = make_tensor(make_smem_ptr(sQ), make_layout(Shape<Int<C>, Int<K>>{}, make_stride(Int<LDQ>{}, _1{})));
        Tensor sBf = make_tensor(make_smem_ptr(sB), make_layout(Shape<Int<C>, Int<K>>{}, make_stride(Int<LDB>{}, _1{})));
        Tensor sSt = make_tensor(make_smem_ptr(sS), make_layout(Shape<Int<BV>, Int<K>>{}, make_stride(_1{}, Int<LDS>{})));
        Tensor sAf = make_tensor(make_smem_ptr(sA), make_layout(Shape<Int<C>, Int<C>>{}, make_stride(Int<LDA>{}, _1{})));
        Tensor sVt = make_tensor(make_smem_ptr(sV), make_layout(Shape<Int<BV>, Int<C>>{}, make_stride(_1{}, Int<LDV>{})));

        Tensor acc = partition_fragment_C(mmaO, Shape<Int<C>, Int<BV>>{});
        clear(acc);

        // inter-chunk
        Tensor tAq = thr.partition_A(sQf);
        Tensor tAb = thr.partition_A(sBf);
        Tensor rQg = thr.partition_fragment_A(sQf);
        Tensor rSt = thr.partition_fragment_B(sSt);
        auto s2rS = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, T>{}, mmaO);
        auto ts2rS = s2rS.get_thread_slice(tid);
        Tensor tXsS = ts2rS.partition_S(sSt);
        Tensor tXrS = ts2rS.retile_D(rSt);
        CUTE_UNROLL
        for (int kk = 0; kk < size<2>(rQg); ++kk) {
          copy(s2rS, tXsS(_, _, kk), tXrS(_, _, kk));
          CUTE_UNROLL
          for (int i = 0; i < size<0>(rQg); i += 2) {
            const float2 x = load_pair(&tAq(i, 0, kk));
            const float2 b = *reinterpret_cast<const float2*>(&tAb(i, 0, kk));
            rQg(i, 0, kk) = T(x.x * scale * ex2(b.x));
            rQg(i + 1, 0, kk) = T(x.y * scale * ex2(b.y));
          }
          gemm(mmaO, acc, rQg(_, _, kk), rSt(_, _, kk), acc);
        }

        // intra-chunk: key blocks 0..wi only (the scores above the diagonal are zero)
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mmaO, sAf, sVt, acc, tid, 0, warp % 4 + 1);

        store_output<T, C, BV>(ob + int64_t(c) * C * HV, HV, Lr, thr, acc);
      }
      }  // scores and output

      // ---------------- state update: S = exp(G) S + kg^T v ----------------
      // Into the registers before the barrier: it reads only kg^T, v and exp(G), so the warps
      // that finish the output first (the causal A v is uneven across them) go on with it.
      {
        CUTE_UNROLL
        for (int i = 0; i < size(rS); ++i) rS(i) *= sGam[get<0>(tUc(i))];
        Tensor sKTf = make_tensor(make_smem_ptr(sKT), make_layout(Shape<Int<K>, Int<C>>{}, make_stride(Int<LDKT>{}, _1{})));
        Tensor sVt = make_tensor(make_smem_ptr(sV), make_layout(Shape<Int<BV>, Int<C>>{}, make_stride(_1{}, Int<LDV>{})));
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mmaU, sKTf, sVt, rS, tid);
      }
      __syncthreads();  // q, k, b/g, A, S no longer read
      if (c + 1 < nchunks) {
        load_qg(c + 1);
        cp_async_commit();
      }
      // S for the next chunk's output (the barrier at the top of the loop orders it)
      CUTE_UNROLL
      for (int i = 0; i < size(rS); i += 2) *reinterpret_cast<uint32_t*>(&tUsS(i)) = pack2<T>(rS(i), rS(i + 1));
    }

    if (seg == last_seg) {
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV>(p, n, h, vt, len, rS, tUc);
      store_final_state<K, BV, false, kPool != chunk_fwd_cfg::kNoPool>(p, n, h, vt, rS, tUc);
    }
  }
};

// K = 64: two CTAs per SM (<= 128 registers, ~100 KB of smem each) hide each other's latency.
#ifndef GLA_CHUNK_FWD_K64_MIN_BLOCKS
#define GLA_CHUNK_FWD_K64_MIN_BLOCKS 2
#endif
template <class T, class GT, int K, int BV, bool kSave, int kPool>
__global__ void __launch_bounds__(chunk_fwd_cfg::kThreads, K == 64 ? GLA_CHUNK_FWD_K64_MIN_BLOCKS : 1)
    chunk_fwd_kernel(const FwdParams p, const chunk_fwd_cfg::Split sp) {
  extern __shared__ __align__(128) unsigned char smem[];
  Kernel<T, GT, K, BV, kSave, kPool>::run(p, sp, smem);
}

}  // namespace chunk_fwd_detail
}  // namespace gla
