// Fused chunked GLA backward: the reverse kernel.
//
// One CTA (8 warps) per (sequence, head, V tile of BV = 64 columns). The CTA walks the
// chunks (C = 64 tokens) from last to first, keeping dh, the gradient with respect to the
// state at the end of the current chunk (K x BV float32), in registers (MMA accumulators),
// seeded with the final-state gradient. The state entering each chunk, h, comes from the
// workspace written by the state walk (chunk_bwd_states.cuh). With b = log2(e) * inclusive
// cumsum of g inside the chunk and G = b of its last row (every exp2 argument <= 0):
//
//   load    q, k, g (K wide), v, do (BV wide) by cp.async; rows past the end zero-filled.
//   h       h (float32, from the workspace) -> smem in the input dtype; rowsum(h * dh) per
//           channel (float32) for dg.
//   prep    b (float32, smem), exp(G), kg = k exp2(G - b) (input dtype).
//   scores  A = scale tril(q k^T gated) as in the forward (diagonal 16 x 16 blocks element-wise
//           in float32 with running products of exp(g), staged in the dq/dk float buffers; the
//           others by MMA on operands gated relative to a reference row);
//           dA = scale do v^T (this V tile's part).
//   dv      dv = kg dh + A^T do                            (complete for this V tile)
//   dq, dk  per 64-channel half, into float32 smem:
//           dq = exp2(b_t - b_r) [scale exp2(b_r) (do h^T) + dA k~],  k~_s = k_s exp2(b_r - b_s),
//                r = first row of t's 16-row block (blocks below the diagonal);
//           dk_intra = exp2(b_R - b_s) [dA^T q~],  q~_t = q_t exp2(b_t - b_R),
//                R = first row of the block after s's block;
//           dk_inter = exp2(G - b_s) (v dh^T);
//           then per (16-row block, channel) thread: the diagonal blocks element-wise (weights
//           exp2(b_t - b_s) as running products of the per-step factors), and
//           dg_t = sum_{u >= t} (q dq - k dk_intra)_u + sum_{s < t} (k dk_inter)_s
//                  + exp(G) rowsum(h * dh)
//           (the s == t terms, which cancel exactly, are left out of the sums and added to dq,
//           dk afterwards: no O(1) cancellation for strong gates), as float32 scans.
//   update  dh = exp2(G) dh + (scale q exp2(b))^T do.
// After the first chunk dh is the gradient with respect to the initial state.
//
// With several V tiles (sm_90+) the CTAs of one (sequence, head) form a thread-block cluster:
// each CTA leaves its tile's dq, dk, dg (float32) in shared memory and every CTA sums a share of
// the rows over all CTAs of the cluster, in rank order, through distributed shared memory
// (deterministic, no float atomics). Before sm_90 they are float32 partials per tile (BwdParams).
#pragma once

#include <cute/tensor.hpp>

#include "cute_gemm.cuh"
#include "device_common.cuh"
#include "chunk_bwd_config.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define GLA_CHUNK_BWD_CLUSTER 1
#endif

namespace gla {
namespace chunk_bwd_detail {

using namespace cute;

template <class T_, class GT_, int K_>
struct Kernel {
  using T = T_;
  using GT = GT_;
  static constexpr int K = K_;
  static constexpr int C = chunk_bwd_cfg::kChunk, NT = chunk_bwd_cfg::kThreads, BV = chunk_bwd_cfg::kBV;
  static constexpr chunk_bwd_cfg::Smem L{K};
  static constexpr int LDQ = L.ldq(), LDB = L.ldb(), LDV = L.ldv(), LDH = L.ldh(), LDA = L.lda(),
                       LDQT = L.ldqt(), LDF = L.ldf(), TPC = L.tpc(), RPT = C / TPC;
  static constexpr int kSmem = L.bytes();
  static constexpr int NCH = K / 64;  // 8-channel pieces per lane in the diagonal score blocks
  static constexpr int NKH = K / 64;  // 64-channel halves of dq, dk
  static_assert(K == 64 || K == 128, "K in {64, 128}");
  static_assert(C == 64 && NT == 256 && BV == 64, "warp roles assume 8 warps, 64-token chunks, BV 64");

  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  // C x 64 outputs (dA, dv, a 64-channel half of dq / dk): warp w%4 owns rows 16*(w%4).., 2 along N
  using MmaO = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));
  // the K x BV state gradient (warps 4 along K, 2 along V)
  using MmaU = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));
  // one warp, one 16 x 16 score block
  using MmaS = decltype(make_tiled_mma(Atom{}, Layout<Shape<_1, _1, _1>>{}, Tile<_16, _16, _16>{}));

  template <class Layout_>
  static __device__ auto smem_view(T* ptr, Layout_ l) { return make_tensor(make_smem_ptr(ptr), l); }

  static __device__ void run(const BwdParams& p, unsigned char* smem) {
    T* sQ = reinterpret_cast<T*>(smem + L.off_q());
    T* sK = reinterpret_cast<T*>(smem + L.off_k());
    float* sB = reinterpret_cast<float*>(smem + L.off_b());
    GT* sG = reinterpret_cast<GT*>(smem + L.off_b());  // raw g staged in the b buffer
    T* sV = reinterpret_cast<T*>(smem + L.off_v());
    T* sDO = reinterpret_cast<T*>(smem + L.off_do());
    T* sH = reinterpret_cast<T*>(smem + L.off_h());
    T* sDH = reinterpret_cast<T*>(smem + L.off_dh());
    T* sA = reinterpret_cast<T*>(smem + L.off_a());
    T* sDA = reinterpret_cast<T*>(smem + L.off_da());
    float* sDAd = reinterpret_cast<float*>(smem + L.off_dad());
    T* sKG = reinterpret_cast<T*>(smem + L.off_kg());   // kg [C][LDQ], then qg^T [K][LDQT]
    float* sDQ = reinterpret_cast<float*>(smem + L.off_f());
    float* sDK = sDQ + C * LDF;
    float* sDKI = sDK + C * LDF;
    float* sGam = reinterpret_cast<float*>(smem + L.off_gam());
    float* sDGH = reinterpret_cast<float*>(smem + L.off_dgh());
    float* sTot = reinterpret_cast<float*>(smem + L.off_tot());
    float* sScan = reinterpret_cast<float*>(smem + L.off_scan());
    // per-step factors exp(g) for the diagonal score blocks, in the float buffers (free until dq)
    float* sE = sDQ;
    static_assert(C * LDB * 4 <= 3 * C * LDF * 4, "exp(g) must fit in the float buffers");

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H, vt = blockIdx.y;
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    const int64_t len = eos > bos ? eos - bos : 0;
    const int nchunks = int((len + C - 1) / C);
    const int64_t HK = int64_t(p.H) * K, HV = int64_t(p.H) * p.V;
    const T* qb = static_cast<const T*>(p.q) + bos * HK + int64_t(h) * K;
    const T* kb = static_cast<const T*>(p.k) + bos * HK + int64_t(h) * K;
    const GT* gb = static_cast<const GT*>(p.g) + bos * HK + int64_t(h) * K;
    const T* vb = static_cast<const T*>(p.v) + bos * HV + int64_t(h) * p.V + vt * BV;
    const T* dob = static_cast<const T*>(p.dout) + bos * HV + int64_t(h) * p.V + vt * BV;
    T* dvb = static_cast<T*>(p.dv) + bos * HV + int64_t(h) * p.V + vt * BV;
    const int64_t kout = bos * HK + int64_t(h) * K;  // element offset of (first token, head) in dq/dk/dg
    const float scale = p.scale;

    auto rows_in = [&](int c) { return int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C); };
    auto load_qkgv = [&](int c) {
      const int Lr = rows_in(c);
      const int64_t t0 = int64_t(c) * C;
      load_tile<NT, C, K>(sQ, LDQ, qb + t0 * HK, HK, Lr, tid);
      load_tile<NT, C, K>(sK, LDQ, kb + t0 * HK, HK, Lr, tid);
      load_tile<NT, C, K>(sG, K, gb + t0 * HK, HK, Lr, tid);
      load_tile<NT, C, BV>(sV, LDV, vb + t0 * HV, HV, Lr, tid);
    };
    auto load_do = [&](int c) {
      load_tile<NT, C, BV>(sDO, LDV, dob + int64_t(c) * C * HV, HV, rows_in(c), tid);
    };

    // ---- dh, float32 in registers
    MmaU mmaU;
    auto thrU = mmaU.get_thread_slice(tid);
    Tensor rS = partition_fragment_C(mmaU, Shape<Int<K>, Int<BV>>{});
    Tensor tUc = thrU.partition_C(make_identity_tensor(Shape<Int<K>, Int<BV>>{}));
    Tensor tUsDH = thrU.partition_C(smem_view(sDH, make_layout(Shape<Int<K>, Int<BV>>{}, make_stride(Int<LDH>{}, _1{}))));
    Tensor tUsH = thrU.partition_C(smem_view(sH, make_layout(Shape<Int<K>, Int<BV>>{}, make_stride(Int<LDH>{}, _1{}))));
    constexpr int MM = size<1>(rS);  // M repeats of the state fragment
    const int64_t state_off = (int64_t(n) * p.H + h) * K * p.V + int64_t(vt) * BV;
    if (p.dht != nullptr) {
      CUTE_UNROLL
      for (int i = 0; i < size(rS); i += 2) {
        const float2 x = *reinterpret_cast<const float2*>(p.dht + state_off + int64_t(get<0>(tUc(i))) * p.V + get<1>(tUc(i)));
        rS(i) = x.x;
        rS(i + 1) = x.y;
      }
    } else {
      clear(rS);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(rS); ++i) tUsDH(i) = T(rS(i));

    if (nchunks > 0) {
      load_qkgv(nchunks - 1);
      load_do(nchunks - 1);
      cp_async_commit();
    }

    for (int c = nchunks - 1; c >= 0; --c) {
      const int Lr = rows_in(c);
      cp_async_wait<0>();
      __syncthreads();
      if (c > 0) {  // the previous chunk's inputs and state come through L2
        const int64_t t1 = int64_t(c - 1) * C;
        prefetch_rows<NT>(qb + t1 * HK, C, K * int(sizeof(T)), HK * int(sizeof(T)), tid);
        prefetch_rows<NT>(kb + t1 * HK, C, K * int(sizeof(T)), HK * int(sizeof(T)), tid);
        prefetch_rows<NT>(gb + t1 * HK, C, K * int(sizeof(GT)), HK * int(sizeof(GT)), tid);
        prefetch_rows<NT>(vb + t1 * HV, C, BV * int(sizeof(T)), HV * int(sizeof(T)), tid);
        prefetch_rows<NT>(dob + t1 * HV, C, BV * int(sizeof(T)), HV * int(sizeof(T)), tid);
        prefetch_rows<NT>(p.ws + (chunk_bwd_cfg::slot(n, bos, c - 1) * p.H + h) * K * p.V + int64_t(vt) * BV, K,
                          BV * 4, int64_t(p.V) * 4, tid);
      }

      // ---------------- h: to smem (input dtype); rowsum(h * dh) per channel ----------------
      {
        const float* hs = p.ws + (chunk_bwd_cfg::slot(n, bos, c) * p.H + h) * K * p.V + int64_t(vt) * BV;
        float part[2 * MM];
        CUTE_UNROLL
        for (int j = 0; j < 2 * MM; ++j) part[j] = 0.f;
        CUTE_UNROLL
        for (int i = 0; i < size(rS); i += 2) {
          const float2 x = *reinterpret_cast<const float2*>(hs + int64_t(get<0>(tUc(i))) * p.V + get<1>(tUc(i)));
          tUsH(i) = T(x.x);
          tUsH(i + 1) = T(x.y);
          // fragment index i = v + 4 * (m + MM * nn): v / 2 picks the row half, m the M repeat
          part[(i % 4) / 2 + 2 * ((i / 4) % MM)] += x.x * rS(i) + x.y * rS(i + 1);
        }
        CUTE_UNROLL
        for (int j = 0; j < 2 * MM; ++j) {
          part[j] += __shfl_xor_sync(0xffffffffu, part[j], 1);
          part[j] += __shfl_xor_sync(0xffffffffu, part[j], 2);
        }
        if ((lane & 3) == 0) {
          const int wn = warp / 4;
          CUTE_UNROLL
          for (int j = 0; j < 2 * MM; ++j) sDGH[wn * K + get<0>(tUc(4 * (j / 2) + 2 * (j % 2)))] = part[j];
        }
      }

      // ---------------- prep: b, exp(G), kg ----------------
      {
        const int ch = tid % K, sg = tid / K;
        float gv[RPT];
        const float2 cs = chunk_cumsum<RPT, TPC>(sG, K, ch, sg, C, sTot, K, gv);  // then b may overwrite g
        const float off = cs.x, gam = cs.y;
        const float gam2 = gam * kLog2e;
        if (sg == 0) sGam[ch] = ex2(gam2);
        float bprev = off * kLog2e;  // b of the row before this segment
        CUTE_UNROLL
        for (int r = 0; r < RPT; ++r) {
          const int t = sg * RPT + r;
          const float b = (gv[r] + off) * kLog2e;
          sB[t * LDB + ch] = b;
          sE[t * LDB + ch] = ex2(b - bprev);  // exp(g_t) <= 1 (row 0 is never read)
          bprev = b;
          sKG[t * LDQ + ch] = T(float(sK[t * LDQ + ch]) * ex2(gam2 - b));
        }
      }
      __syncthreads();

      // ---------------- scores A -> sA, dA -> sDA (+ float32 diagonal blocks) ----------------
      {
        // Diagonal 16 x 16 blocks of A, element-wise in float32: warp pair (2d, 2d+1) owns
        // block d; 8 lanes own query rows ta and 15 - ta, NCH pieces of 8 channels per lane.
        // Keys are walked from s = t down with w = exp(b_t - b_s) a running product of the
        // per-step factors (no exp, every factor <= 1).
        const int d = warp >> 1, gq = lane >> 3, li = lane & 7;
        const int ta = (warp & 1) * 4 + gq, tb = 15 - ta;
        float qf[NCH * 8], w[NCH * 8];
        for (int pp = 0; pp < 17; ++pp) {
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
              CUTE_UNROLL
              for (int e = 0; e < 8; ++e) qf[m * 8 + e] = float(qe[e]);
            }
          }
          float acc = 0.f;
          CUTE_UNROLL
          for (int m = 0; m < NCH; ++m) {
            const int cc = (li + 8 * m) * 8;
            const uint4 ka = *reinterpret_cast<const uint4*>(sK + rs * LDQ + cc);
            const T* ke = reinterpret_cast<const T*>(&ka);
            // w(t, s) = w(t, s + 1) * e_{s+1}; the row index is clamped when unused (first)
            const int re = first ? rs : rs + 1;
            const float4 e0 = *reinterpret_cast<const float4*>(sE + re * LDB + cc);
            const float4 e1 = *reinterpret_cast<const float4*>(sE + re * LDB + cc + 4);
            const float ev[8] = {e0.x, e0.y, e0.z, e0.w, e1.x, e1.y, e1.z, e1.w};
            CUTE_UNROLL
            for (int e = 0; e < 8; ++e) {
              w[m * 8 + e] = first ? 1.f : w[m * 8 + e] * ev[e];
              acc += qf[m * 8 + e] * float(ke[e]) * w[m * 8 + e];
            }
          }
          acc += __shfl_xor_sync(0xffffffffu, acc, 1);
          acc += __shfl_xor_sync(0xffffffffu, acc, 2);
          acc += __shfl_xor_sync(0xffffffffu, acc, 4);
          if (li == 0) sA[rt * LDA + rs] = T(acc * scale);
        }
        for (int s = ta + 1 + li; s < 16; s += 8) sA[(16 * d + ta) * LDA + 16 * d + s] = T(0.f);
        for (int s = tb + 1 + li; s < 16; s += 8) sA[(16 * d + tb) * LDA + 16 * d + s] = T(0.f);

        // Blocks below the diagonal: warp w < 6 owns block (bi, bj), reference row r = 16 bi.
        if (warp < 6) {
          const int bi = warp < 1 ? 1 : (warp < 3 ? 2 : 3);
          const int bj = warp < 1 ? 0 : (warp < 3 ? warp - 1 : warp - 3);
          MmaS mmaS;
          auto thr = mmaS.get_thread_slice(lane);
          auto lq = make_layout(Shape<_16, Int<K>>{}, make_stride(Int<LDQ>{}, _1{}));
          auto lb = make_layout(Shape<_16, Int<K>>{}, make_stride(Int<LDB>{}, _1{}));
          auto lr = make_layout(Shape<_16, Int<K>>{}, make_stride(_0{}, _1{}));
          Tensor sQi = smem_view(sQ + 16 * bi * LDQ, lq);
          Tensor sBi = make_tensor(make_smem_ptr(sB + 16 * bi * LDB), lb);
          Tensor sBr = make_tensor(make_smem_ptr(sB + 16 * bi * LDB), lr);
          Tensor sKj = smem_view(sK + 16 * bj * LDQ, lq);
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
            CUTE_UNROLL
            for (int i = 0; i < size<0>(rA); ++i)
              rA(i, 0, kk) = T(float(tAq(i, 0, kk)) * ex2(tAb(i, 0, kk) - tAr(i, 0, kk)));
            CUTE_UNROLL
            for (int nn = 0; nn < size<1>(rB); ++nn)
              CUTE_UNROLL
              for (int i = 0; i < size<0>(rB); ++i)
                rB(i, nn, kk) = T(float(tBk(i, nn, kk)) * ex2(tBr(i, nn, kk) - tBb(i, nn, kk)));
            gemm(mmaS, acc, rA(_, _, kk), rB(_, _, kk), acc);
          }
          Tensor tC = thr.partition_C(make_tensor(make_smem_ptr(sA + 16 * bi * LDA + 16 * bj),
                                                  make_layout(Shape<_16, _16>{}, make_stride(Int<LDA>{}, _1{}))));
          CUTE_UNROLL
          for (int i = 0; i < size(acc); i += 2)
            *reinterpret_cast<uint32_t*>(&tC(i)) = pack2<T>(acc(i) * scale, acc(i + 1) * scale);
        }

        // dA = scale do v^T (this V tile): every block; the diagonal ones also in float32
        MmaO mma;
        auto thr = mma.get_thread_slice(tid);
        auto lrow = make_layout(Shape<Int<C>, Int<BV>>{}, make_stride(Int<LDV>{}, _1{}));
        Tensor acc = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});
        clear(acc);
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U32x4_LDSM_N, T>(mma, smem_view(sDO, lrow), smem_view(sV, lrow), acc, tid);
        Tensor tC = thr.partition_C(smem_view(sDA, make_layout(Shape<Int<C>, Int<C>>{}, make_stride(Int<LDA>{}, _1{}))));
        Tensor tc = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
        CUTE_UNROLL
        for (int i = 0; i < size(acc); i += 2) {
          const float a0 = acc(i) * scale, a1 = acc(i + 1) * scale;
          *reinterpret_cast<uint32_t*>(&tC(i)) = pack2<T>(a0, a1);
          const int t = get<0>(tc(i)), s = get<1>(tc(i));
          if ((t >> 4) == (s >> 4)) {
            float* dd = sDAd + (t >> 4) * 256 + (t & 15) * 16 + (s & 15);
            dd[0] = a0;
            dd[1] = a1;
          }
        }
      }
      __syncthreads();

      // ---------------- dv = kg dh + A^T do ----------------
      {
        MmaO mma;
        auto thr = mma.get_thread_slice(tid);
        const int wi = warp % 4;
        Tensor sKGf = smem_view(sKG, make_layout(Shape<Int<C>, Int<K>>{}, make_stride(Int<LDQ>{}, _1{})));
        Tensor sDHt = smem_view(sDH, make_layout(Shape<Int<BV>, Int<K>>{}, make_stride(_1{}, Int<LDH>{})));
        Tensor sAt = smem_view(sA, make_layout(Shape<Int<C>, Int<C>>{}, make_stride(_1{}, Int<LDA>{})));
        Tensor sDOt = smem_view(sDO, make_layout(Shape<Int<BV>, Int<C>>{}, make_stride(_1{}, Int<LDV>{})));
        Tensor acc = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});
        clear(acc);
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mma, sKGf, sDHt, acc, tid);
        // key block wi receives from query blocks wi.. only
        gemm_smem<SM75_U16x8_LDSM_T, SM75_U16x8_LDSM_T, T>(mma, sAt, sDOt, acc, tid, wi);
        Tensor gDV = make_tensor(make_gmem_ptr(dvb + int64_t(c) * C * HV),
                                 make_layout(Shape<Int<C>, Int<BV>>{}, make_stride(HV, _1{})));
        Tensor tG = thr.partition_C(gDV);
        Tensor tc = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));
        CUTE_UNROLL
        for (int i = 0; i < size(acc); i += 2)
          if (get<0>(tc(i)) < Lr) *reinterpret_cast<uint32_t*>(&tG(i)) = pack2<T>(acc(i), acc(i + 1));
      }
      __syncthreads();  // kg and A no longer read

      // ---------------- qg^T = (scale q exp2(b))^T -> the kg buffer ----------------
      for (int i = tid; i < K * C / 2; i += NT) {
        const int ch = i % K, t = 2 * (i / K);
        const float q0 = float(sQ[t * LDQ + ch]) * scale * ex2(sB[t * LDB + ch]);
        const float q1 = float(sQ[(t + 1) * LDQ + ch]) * scale * ex2(sB[(t + 1) * LDB + ch]);
        *reinterpret_cast<uint32_t*>(sKG + ch * LDQT + t) = pack2<T>(q0, q1);
      }

      // ---------------- dq, dk, dg, one 64-channel half at a time ----------------
      CUTE_UNROLL
      for (int kh = 0; kh < NKH; ++kh) {
        const int ch0 = kh * 64;
        MmaO mma;
        auto thr = mma.get_thread_slice(tid);
        const int wi = warp % 4;
        auto lf = make_layout(Shape<Int<C>, _64>{}, make_stride(Int<LDF>{}, _1{}));
        auto lbC = make_layout(Shape<Int<C>, _64>{}, make_stride(Int<LDB>{}, _1{}));  // b as (row, channel)
        auto lbR = make_layout(Shape<Int<C>, _64>{}, make_stride(_0{}, _1{}));        // one row, broadcast
        auto lbB = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, Int<LDB>{}));  // b as (channel, row)
        auto lbBR = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, _0{}));
        auto lT = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, Int<LDQ>{}));   // q, k as (channel, row)
        Tensor tCb = thr.partition_C(make_tensor(make_smem_ptr(sB + ch0), lbC));
        Tensor tBb = thr.partition_B(make_tensor(make_smem_ptr(sB + ch0), lbB));
        // a B operand gated in registers: k-block kk times exp2(x - y), x and y B-partitioned b
        auto gate_b = [](auto x, auto y) {
          return [x, y](auto& rB, int kk) {
            CUTE_UNROLL
            for (int nn = 0; nn < size<1>(rB); ++nn)
              CUTE_UNROLL
              for (int i = 0; i < size<0>(rB); ++i)
                rB(i, nn, kk) = T(float(rB(i, nn, kk)) * ex2(x(i, nn, kk) - y(i, nn, kk)));
          };
        };
        Tensor sDOf = smem_view(sDO, make_layout(Shape<Int<C>, Int<BV>>{}, make_stride(Int<LDV>{}, _1{})));
        Tensor sVf = smem_view(sV, make_layout(Shape<Int<C>, Int<BV>>{}, make_stride(Int<LDV>{}, _1{})));
        Tensor sHf = smem_view(sH + ch0 * LDH, make_layout(Shape<_64, Int<BV>>{}, make_stride(Int<LDH>{}, _1{})));
        Tensor sDHf = smem_view(sDH + ch0 * LDH, make_layout(Shape<_64, Int<BV>>{}, make_stride(Int<LDH>{}, _1{})));
        Tensor sDAf = smem_view(sDA, make_layout(Shape<Int<C>, Int<C>>{}, make_stride(Int<LDA>{}, _1{})));
        Tensor sDAt = smem_view(sDA, make_layout(Shape<Int<C>, Int<C>>{}, make_stride(_1{}, Int<LDA>{})));
        Tensor sKt = smem_view(sK + ch0, lT);
        Tensor sQt = smem_view(sQ + ch0, lT);

        // dq = exp2(b_t - b_r) [scale exp2(b_r) (do h^T) + dA k~], r = 16 wi
        {
          const int r = 16 * wi;
          Tensor tCr = thr.partition_C(make_tensor(make_smem_ptr(sB + r * LDB + ch0), lbR));
          Tensor tBr = thr.partition_B(make_tensor(make_smem_ptr(sB + r * LDB + ch0), lbBR));
          Tensor acc = partition_fragment_C(mma, Shape<Int<C>, _64>{});
          clear(acc);
          gemm_smem<SM75_U32x4_LDSM_N, SM75_U32x4_LDSM_N, T>(mma, sDOf, sHf, acc, tid);
          CUTE_UNROLL
          for (int i = 0; i < size(acc); ++i) acc(i) *= scale * ex2(tCr(i));
          // key blocks before the query block, k~ = k exp2(b_r - b_s)
          gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mma, sDAf, sKt, acc, tid, 0, wi,
                                                            gate_b(tBr, tBb));
          Tensor tF = thr.partition_C(make_tensor(make_smem_ptr(sDQ), lf));
          CUTE_UNROLL
          for (int i = 0; i < size(acc); i += 2)
            *reinterpret_cast<float2*>(&tF(i)) =
                make_float2(acc(i) * ex2(tCb(i) - tCr(i)), acc(i + 1) * ex2(tCb(i + 1) - tCr(i + 1)));
        }
        // dk_inter = exp2(G - b_s) (v dh^T)
        {
          Tensor tCg = thr.partition_C(make_tensor(make_smem_ptr(sB + (C - 1) * LDB + ch0), lbR));
          Tensor acc = partition_fragment_C(mma, Shape<Int<C>, _64>{});
          clear(acc);
          gemm_smem<SM75_U32x4_LDSM_N, SM75_U32x4_LDSM_N, T>(mma, sVf, sDHf, acc, tid);
          Tensor tF = thr.partition_C(make_tensor(make_smem_ptr(sDKI), lf));
          CUTE_UNROLL
          for (int i = 0; i < size(acc); i += 2)
            *reinterpret_cast<float2*>(&tF(i)) =
                make_float2(acc(i) * ex2(tCg(i) - tCb(i)), acc(i + 1) * ex2(tCg(i + 1) - tCb(i + 1)));
        }
        // dk_intra = exp2(b_R - b_s) [dA^T q~], R = 16 (wi + 1) (blocks below the diagonal)
        {
          const int R = wi < 3 ? 16 * (wi + 1) : C - 1;
          Tensor tCR = thr.partition_C(make_tensor(make_smem_ptr(sB + R * LDB + ch0), lbR));
          Tensor tBR = thr.partition_B(make_tensor(make_smem_ptr(sB + R * LDB + ch0), lbBR));
          Tensor acc = partition_fragment_C(mma, Shape<Int<C>, _64>{});
          clear(acc);
          // query blocks after the key block, q~ = q exp2(b_t - b_R)
          gemm_smem<SM75_U16x8_LDSM_T, SM75_U16x8_LDSM_T, T>(mma, sDAt, sQt, acc, tid, wi + 1, C / 16,
                                                            gate_b(tBb, tBR));
          Tensor tF = thr.partition_C(make_tensor(make_smem_ptr(sDK), lf));
          CUTE_UNROLL
          for (int i = 0; i < size(acc); i += 2)
            *reinterpret_cast<float2*>(&tF(i)) =
                make_float2(acc(i) * ex2(tCR(i) - tCb(i)), acc(i + 1) * ex2(tCR(i + 1) - tCb(i + 1)));
        }
        __syncthreads();

        // ---- element-wise: the diagonal blocks, the sums for dg, the stores ----
        {
          const int d = tid / 64, cl = tid % 64, ch = ch0 + cl;
          float qv[16], kv[16], e[16], dqd[16], dkd[16];
          float bprev = 0.f;
          CUTE_UNROLL
          for (int t = 0; t < 16; ++t) {
            const int row = 16 * d + t;
            qv[t] = float(sQ[row * LDQ + ch]);
            kv[t] = float(sK[row * LDQ + ch]);
            const float b = sB[row * LDB + ch];
            e[t] = t ? ex2(b - bprev) : 1.f;  // exp(g_t) within the block
            bprev = b;
            dqd[t] = 0.f;
            dkd[t] = 0.f;
          }
          const float* dad = sDAd + d * 256;
          CUTE_UNROLL
          for (int t = 1; t < 16; ++t) {
            float w = 1.f;
            CUTE_UNROLL
            for (int s = t - 1; s >= 0; --s) {
              w *= e[s + 1];  // exp(b_t - b_s)
              const float pw = dad[t * 16 + s] * w;
              dqd[t] += pw * kv[s];
              dkd[s] += pw * qv[t];
            }
          }
          float x[16], y[16];
          CUTE_UNROLL
          for (int t = 0; t < 16; ++t) {
            const int row = 16 * d + t;
            const float dqm = sDQ[row * LDF + cl] + dqd[t];
            const float dkm = sDK[row * LDF + cl] + dkd[t];
            const float dki = sDKI[row * LDF + cl];
            const float att = dad[t * 16 + t];
            x[t] = qv[t] * dqm - kv[t] * dkm;
            y[t] = kv[t] * dki;
            dqd[t] = dqm + att * kv[t];
            dkd[t] = dkm + dki + att * qv[t];
          }
          float run = 0.f;
          CUTE_UNROLL
          for (int t = 15; t >= 0; --t) {
            run += x[t];
            x[t] = run;  // inclusive suffix sum inside the block
          }
          float run_y = 0.f;
          CUTE_UNROLL
          for (int t = 0; t < 16; ++t) {
            const float yt = y[t];
            y[t] = run_y;  // exclusive prefix sum inside the block
            run_y += yt;
          }
          sScan[d * 64 + cl] = run;
          sScan[256 + d * 64 + cl] = run_y;
          __syncthreads();
          float offx = 0.f, offy = 0.f;
          CUTE_UNROLL
          for (int j = 0; j < 4; ++j) {
            if (j > d) offx += sScan[j * 64 + cl];
            if (j < d) offy += sScan[256 + j * 64 + cl];
          }
          const float dgh = (sDGH[ch] + sDGH[K + ch]) * sGam[ch];
          const int64_t base = kout + (int64_t(c) * C + 16 * d) * HK + ch;
          if (p.partials) {
            float* dq = static_cast<float*>(p.dq) + int64_t(vt) * p.part_stride + base;
            float* dk = static_cast<float*>(p.dk) + int64_t(vt) * p.part_stride + base;
            float* dg = static_cast<float*>(p.dg) + int64_t(vt) * p.part_stride + base;
            CUTE_UNROLL
            for (int t = 0; t < 16; ++t)
              if (16 * d + t < Lr) {
                dq[t * HK] = dqd[t];
                dk[t * HK] = dkd[t];
                dg[t * HK] = (x[t] + offx) + (y[t] + offy) + dgh;
              }
          } else if (p.cluster > 1) {
            // this tile's part stays in the float buffers (each thread rewrites only the
            // elements it read above), summed over the cluster below
            CUTE_UNROLL
            for (int t = 0; t < 16; ++t) {
              const int row = 16 * d + t;
              sDQ[row * LDF + cl] = dqd[t];
              sDK[row * LDF + cl] = dkd[t];
              sDKI[row * LDF + cl] = (x[t] + offx) + (y[t] + offy) + dgh;
            }
          } else {
            T* dq = static_cast<T*>(p.dq) + base;
            T* dk = static_cast<T*>(p.dk) + base;
            GT* dg = static_cast<GT*>(p.dg) + base;
            CUTE_UNROLL
            for (int t = 0; t < 16; ++t)
              if (16 * d + t < Lr) {
                dq[t * HK] = T(dqd[t]);
                dk[t * HK] = T(dkd[t]);
                dg[t * HK] = GT((x[t] + offx) + (y[t] + offy) + dgh);
              }
          }
        }
#ifdef GLA_CHUNK_BWD_CLUSTER
        if (p.cluster > 1) {
          // rows vt, vt + cluster, ... of this half: the sum over the cluster's CTAs in rank order
          namespace cg = cooperative_groups;
          cg::cluster_group cluster = cg::this_cluster();
          cluster.sync();  // every CTA's part is in its shared memory
          const int nc = p.cluster, rank = int(cluster.block_rank());
          const int my_rows = (C - rank + nc - 1) / nc;
          for (int i = tid; i < my_rows * 64; i += NT) {
            const int row = rank + nc * (i / 64), cl = i % 64;
            if (row >= Lr) continue;
            float sq = 0.f, sk = 0.f, sg = 0.f;
            for (int j = 0; j < nc; ++j) {
              const int off = row * LDF + cl;
              sq += cluster.map_shared_rank(sDQ, j)[off];
              sk += cluster.map_shared_rank(sDK, j)[off];
              sg += cluster.map_shared_rank(sDKI, j)[off];
            }
            const int64_t o = kout + (int64_t(c) * C + row) * HK + ch0 + cl;
            static_cast<T*>(p.dq)[o] = T(sq);
            static_cast<T*>(p.dk)[o] = T(sk);
            static_cast<GT*>(p.dg)[o] = GT(sg);
          }
          cluster.sync();  // no CTA overwrites its buffers while another reads them
        }
#else
        if (p.cluster > 1) __trap();  // the launcher never asks for clusters below sm_90
#endif
        __syncthreads();  // float buffers and scan totals free for the next half
      }

      // q, k, g, v are no longer read: the previous chunk's come in while dh is updated
      if (c > 0) {
        load_qkgv(c - 1);
        cp_async_commit();
      }
      // ---------------- dh = exp2(G) dh + qg^T do ----------------
      {
        CUTE_UNROLL
        for (int i = 0; i < size(rS); ++i) rS(i) *= sGam[get<0>(tUc(i))];
        Tensor sQT = smem_view(sKG, make_layout(Shape<Int<K>, Int<C>>{}, make_stride(Int<LDQT>{}, _1{})));
        Tensor sDOt = smem_view(sDO, make_layout(Shape<Int<BV>, Int<C>>{}, make_stride(_1{}, Int<LDV>{})));
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mmaU, sQT, sDOt, rS, tid);
      }
      __syncthreads();  // do and qg^T no longer read
      CUTE_UNROLL
      for (int i = 0; i < size(rS); ++i) tUsDH(i) = T(rS(i));
      if (c > 0) {
        load_do(c - 1);
        cp_async_commit();
      }
    }

    if (p.dh0 != nullptr) {
      CUTE_UNROLL
      for (int i = 0; i < size(rS); i += 2)
        *reinterpret_cast<float2*>(p.dh0 + state_off + int64_t(get<0>(tUc(i))) * p.V + get<1>(tUc(i))) =
            make_float2(rS(i), rS(i + 1));
    }
  }
};

template <class T, class GT, int K>
__global__ void __launch_bounds__(chunk_bwd_cfg::kThreads, 1) chunk_bwd_kernel(const BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Kernel<T, GT, K>::run(p, smem);
}

}  // namespace chunk_bwd_detail
}  // namespace gla
