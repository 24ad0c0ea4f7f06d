// The backward's dq, dk and dg, from the saved states h and the dh walk's dh.
//
// One CTA (8 warps) per (chunk slot, head, 64-channel tile of K); every chunk is independent,
// so the grid fills the GPU at any batch size. With b = log2(e) * inclusive cumsum of g inside
// the chunk and G = b of its last row (every exp2 argument <= 0):
//
//   V loop   per 64-column tile of V (cp.async): dA += do v^T, dq~ += do h^T, dk~ += v dh^T
//            (MMA accumulators across the tiles) and rowsum(h * dh) per channel.
//   dq       dq = exp2(b_t - b_r) [scale exp2(b_r) dq~ + dA k~],  k~_s = k_s exp2(b_r - b_s),
//            r = the row before t's 16-row block (key blocks below the diagonal): the nearest
//            key's k~ is k itself, never flushed by float16 with strong gates;
//   dk       dk_intra = exp2(b_R - b_s) [dA^T q~],  q~_t = q_t exp2(b_t - b_R), R = first row
//            of the block after s's block;  dk_inter = exp2(G - b_s) dk~;
//   diagonal the 16 x 16 diagonal blocks element-wise in float32 (weights exp2(b_t - b_s) as
//            running products of the per-step factors), one thread per (16-row block, channel);
//   dg       dg_t = sum_{u >= t} (q dq - k dk_intra)_u + sum_{s < t} (k dk_inter)_s
//                   + exp(G) rowsum(h * dh)
//            (the s == t terms, which cancel exactly, are left out of the sums and added to
//            dq and dk afterwards: no O(1) cancellation with strong gates), float32 scans.
// This is exact for any gate (no single-reference vote). Nothing is summed across CTAs, so the
// gradients are bitwise deterministic.
#pragma once

#include <cute/tensor.hpp>

#include "cute_gemm.cuh"
#include "device_common.cuh"
#include "state_tile.cuh"
#include "chunk_bwd_config.h"

namespace gla {
namespace chunk_bwd_detail {

using namespace cute;

template <class T, class GT>
struct Dqkg {
  static constexpr int C = chunk_bwd_cfg::kChunk, NT = chunk_bwd_cfg::kThreads, BK = 64, BV = 64;
  static constexpr chunk_bwd_cfg::DqkgSmem L{};
  static constexpr int LD = L.ld(), LDB = L.ldb(), LDF = L.ldf();
  static constexpr int TPC = NT / BK, RPT = C / TPC;  // cumsum: threads per channel, rows per thread
  static_assert(C == 64 && NT == 256, "warp roles assume 8 warps and 64-token chunks");

  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  // C x 64 outputs: warp w owns rows 16 (w % 4) .., columns 32 (w / 4) ..
  using Mma = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));

  template <class E, class Layout_>
  static __device__ auto view(E* ptr, Layout_ l) { return make_tensor(make_smem_ptr(ptr), l); }

  static __device__ void run(const BwdParams& p, unsigned char* smem) {
    T* sQ = reinterpret_cast<T*>(smem + L.off_q());
    T* sK = reinterpret_cast<T*>(smem + L.off_k());
    float* sB = reinterpret_cast<float*>(smem + L.off_b());
    GT* sG = reinterpret_cast<GT*>(smem + L.off_b());  // raw g staged in the b buffer
    T* sDO = reinterpret_cast<T*>(smem + L.off_stage());
    T* sV = sDO + C * LD;
    T* sH = sV + C * LD;
    T* sDH = sH + BK * LD;
    float* sF0 = reinterpret_cast<float*>(smem + L.off_stage());  // two float buffers over the stage
    float* sF1 = sF0 + C * LDF;
    float* sF2 = reinterpret_cast<float*>(smem + L.off_f2());
    T* sDA = reinterpret_cast<T*>(smem + L.off_da());
    float* sDAd = reinterpret_cast<float*>(smem + L.off_dad());
    float* sGam = reinterpret_cast<float*>(smem + L.off_gam());
    float* sDGH = reinterpret_cast<float*>(smem + L.off_dgh());
    float* sTot = reinterpret_cast<float*>(smem + L.off_tot());
    float* sScan = reinterpret_cast<float*>(smem + L.off_scan());

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wi = warp % 4;
    // the K tiles of one slot are neighbours in the grid: they share do and v through L2
    const int64_t slot = blockIdx.x / (p.K / BK);
    const int hh = blockIdx.y, kt = int(blockIdx.x % (p.K / BK));
    int n;
    int64_t t0;
    const int rows = slot_rows(p, slot, C, n, t0);
    if (rows == 0) return;
    const int64_t HK = int64_t(p.H) * p.K, HV = int64_t(p.H) * p.V;
    const int64_t kout = t0 * HK + int64_t(hh) * p.K + kt * BK;  // (first token, head, tile) in q/k/g
    const T* dob = static_cast<const T*>(p.dout) + t0 * HV + int64_t(hh) * p.V;
    const T* vb = static_cast<const T*>(p.v) + t0 * HV + int64_t(hh) * p.V;
    const int64_t soff = ((slot * p.H + hh) * p.K + kt * BK) * p.V;  // the tile's rows of h, dh
    using HT = typename KeptState<T>::type;  // h and dh: float32 for float16 inputs, rounded here
    const HT* hb = static_cast<const HT*>(p.saved_h) + soff;
    const HT* dhb = static_cast<const HT*>(p.dh) + soff;
    const float scale = p.scale;
    const int nvt = p.V / BV;

    auto load_v_tile = [&](int j) {
      load_tile<NT, C, BV>(sDO, LD, dob + j * BV, HV, rows, tid);
      load_tile<NT, C, BV>(sV, LD, vb + j * BV, HV, rows, tid);
      load_tile_from<NT, BK, BV>(sH, LD, hb + j * BV, p.V, BK, tid);
      load_tile_from<NT, BK, BV>(sDH, LD, dhb + j * BV, p.V, BK, tid);
      cp_async_commit();
    };
    load_tile<NT, C, BK>(sQ, LD, static_cast<const T*>(p.q) + kout, HK, rows, tid);
    load_tile<NT, C, BK>(sK, LD, static_cast<const T*>(p.k) + kout, HK, rows, tid);
    load_tile<NT, C, BK>(sG, BK, static_cast<const GT*>(p.g) + kout, HK, rows, tid);
    load_v_tile(0);
    for (int j = 1; j < nvt; ++j) {  // the later V tiles come through L2
      prefetch_rows<NT>(dob + j * BV, rows, BV * int(sizeof(T)), HV * int(sizeof(T)), tid);
      prefetch_rows<NT>(vb + j * BV, rows, BV * int(sizeof(T)), HV * int(sizeof(T)), tid);
      prefetch_rows<NT>(hb + j * BV, BK, BV * int(sizeof(HT)), p.V * int(sizeof(HT)), tid);
      prefetch_rows<NT>(dhb + j * BV, BK, BV * int(sizeof(HT)), p.V * int(sizeof(HT)), tid);
    }
    cp_async_wait<0>();
    __syncthreads();

    // ---- b = log2(e) cumsum(g) in place, exp(G); which of this thread's gates are clamped
    // (kGateMin: their dg is 0). The epilogue's thread (d, cl) is this one (part, ch), so the
    // bits stay in a register instead of g being read again from memory.
    static_assert(RPT == 16 && TPC == 4 && NT == 4 * 64, "the epilogue takes rows 16 d.. of channel tid % 64");
    uint32_t clamped = 0;
    {
      const int ch = tid % BK, part = tid / BK;
      CUTE_UNROLL
      for (int r = 0; r < RPT; ++r)
        if (float(sG[(part * RPT + r) * BK + ch]) <= kGateMin) clamped |= 1u << r;
      float gv[RPT];
      const float2 cs = chunk_cumsum<RPT, TPC>(sG, BK, ch, part, C, sTot, BK, gv);  // then b may overwrite g
      if (part == 0) sGam[ch] = ex2(cs.y * kLog2e);
      CUTE_UNROLL
      for (int r = 0; r < RPT; ++r) sB[(part * RPT + r) * LDB + ch] = (gv[r] + cs.x) * kLog2e;
    }

    // ---- the V loop: dA, do h^T, v dh^T, rowsum(h * dh)
    Mma mma;
    auto thr = mma.get_thread_slice(tid);
    auto lrow = make_layout(Shape<Int<C>, Int<BV>>{}, make_stride(Int<LD>{}, _1{}));
    Tensor accA = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});
    Tensor accQ = partition_fragment_C(mma, Shape<Int<C>, Int<BK>>{});
    Tensor accK = partition_fragment_C(mma, Shape<Int<C>, Int<BK>>{});
    clear(accA);
    clear(accQ);
    clear(accK);
    float dgh = 0.f;  // this thread's part of rowsum(h * dh) for channel tid / 4
    for (int j = 0; j < nvt; ++j) {
      if (j > 0) {
        load_v_tile(j);
        cp_async_wait<0>();
        __syncthreads();
      }
      gemm_smem<SM75_U32x4_LDSM_N, SM75_U32x4_LDSM_N, T>(mma, view(sDO, lrow), view(sV, lrow), accA, tid);
      gemm_smem<SM75_U32x4_LDSM_N, SM75_U32x4_LDSM_N, T>(mma, view(sDO, lrow), view(sH, lrow), accQ, tid);
      gemm_smem<SM75_U32x4_LDSM_N, SM75_U32x4_LDSM_N, T>(mma, view(sV, lrow), view(sDH, lrow), accK, tid);
      {
        const int ch = tid / 4, c0 = (tid % 4) * 16;
        CUTE_UNROLL
        for (int x = 0; x < 16; x += 8) {
          const uint4 ha = *reinterpret_cast<const uint4*>(sH + ch * LD + c0 + x);
          const uint4 da = *reinterpret_cast<const uint4*>(sDH + ch * LD + c0 + x);
          const T* he = reinterpret_cast<const T*>(&ha);
          const T* de = reinterpret_cast<const T*>(&da);
          CUTE_UNROLL
          for (int e = 0; e < 8; ++e) dgh += float(he[e]) * float(de[e]);
        }
      }
      __syncthreads();  // the stage is free
    }
    dgh += __shfl_xor_sync(0xffffffffu, dgh, 1);
    dgh += __shfl_xor_sync(0xffffffffu, dgh, 2);
    if ((lane & 3) == 0) sDGH[tid / 4] = dgh * sGam[tid / 4];

    // ---- dA (scaled): the input dtype for the MMAs, float32 for the diagonal blocks
    {
      Tensor tC = thr.partition_C(view(sDA, make_layout(Shape<Int<C>, Int<C>>{}, make_stride(Int<LD>{}, _1{}))));
      Tensor tc = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
      CUTE_UNROLL
      for (int i = 0; i < size(accA); i += 2) {
        const float a0 = accA(i) * scale, a1 = accA(i + 1) * scale;
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

    // ---- dq, dk_intra, dk_inter (MMA accumulators)
    auto lbC = make_layout(Shape<Int<C>, _64>{}, make_stride(Int<LDB>{}, _1{}));  // b as (row, channel)
    auto lbR = make_layout(Shape<Int<C>, _64>{}, make_stride(_0{}, _1{}));        // one row, broadcast
    auto lbB = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, Int<LDB>{}));  // b as (channel, row)
    auto lbBR = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, _0{}));
    auto lT = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, Int<LD>{}));    // q, k as (channel, row)
    auto lA = make_layout(Shape<Int<C>, Int<C>>{}, make_stride(Int<LD>{}, _1{}));
    auto lAt = make_layout(Shape<Int<C>, Int<C>>{}, make_stride(_1{}, Int<LD>{}));
    Tensor tCb = thr.partition_C(view(sB, lbC));
    Tensor tBb = thr.partition_B(view(sB, lbB));
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
    {  // dq = exp2(b_t - b_r) [scale exp2(b_r) (do h^T) + dA k~], r = 16 wi - 1 (0 for no key blocks)
      const int r = wi > 0 ? 16 * wi - 1 : 0;
      Tensor tCr = thr.partition_C(view(sB + r * LDB, lbR));
      Tensor tBr = thr.partition_B(view(sB + r * LDB, lbBR));
      CUTE_UNROLL
      for (int i = 0; i < size(accQ); ++i) accQ(i) *= scale * ex2(tCr(i));
      gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mma, view(sDA, lA), view(sK, lT), accQ, tid, 0, wi,
                                                         gate_b(tBr, tBb));
      CUTE_UNROLL
      for (int i = 0; i < size(accQ); ++i) accQ(i) *= ex2(tCb(i) - tCr(i));
    }
    {  // dk_inter = exp2(G - b_s) (v dh^T)
      Tensor tCg = thr.partition_C(view(sB + (C - 1) * LDB, lbR));
      CUTE_UNROLL
      for (int i = 0; i < size(accK); ++i) accK(i) *= ex2(tCg(i) - tCb(i));
    }
    Tensor accI = partition_fragment_C(mma, Shape<Int<C>, Int<BK>>{});
    clear(accI);
    {  // dk_intra = exp2(b_R - b_s) [dA^T q~], R = 16 (wi + 1): query blocks after the key block
      const int R = wi < 3 ? 16 * (wi + 1) : C - 1;
      Tensor tCR = thr.partition_C(view(sB + R * LDB, lbR));
      Tensor tBR = thr.partition_B(view(sB + R * LDB, lbBR));
      gemm_smem<SM75_U16x8_LDSM_T, SM75_U16x8_LDSM_T, T>(mma, view(sDA, lAt), view(sQ, lT), accI, tid, wi + 1,
                                                         C / 16, gate_b(tBb, tBR));
      CUTE_UNROLL
      for (int i = 0; i < size(accI); ++i) accI(i) *= ex2(tCR(i) - tCb(i));
    }
    auto lf = make_layout(Shape<Int<C>, _64>{}, make_stride(Int<LDF>{}, _1{}));
    auto to_floats = [&](float* buf, const auto& acc) {
      Tensor tF = thr.partition_C(view(buf, lf));
      CUTE_UNROLL
      for (int i = 0; i < size(acc); i += 2) *reinterpret_cast<float2*>(&tF(i)) = make_float2(acc(i), acc(i + 1));
    };
    to_floats(sF0, accQ);
    to_floats(sF1, accI);
    to_floats(sF2, accK);
    __syncthreads();

    // ---- element-wise: the diagonal blocks, the scans for dg, the stores
    const int d = tid / 64, cl = tid % 64;
    float qv[16], kv[16], dqd[16], dkd[16], x[16], y[16];
    {
      float e[16];
      float bprev = 0.f;
      CUTE_UNROLL
      for (int t = 0; t < 16; ++t) {
        const int row = 16 * d + t;
        qv[t] = float(sQ[row * LD + cl]);
        kv[t] = float(sK[row * LD + cl]);
        const float b = sB[row * LDB + cl];
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
      float run_x = 0.f, run_y = 0.f;
      CUTE_UNROLL
      for (int t = 0; t < 16; ++t) {
        const int row = 16 * d + t;
        const float dqm = sF0[row * LDF + cl] + dqd[t];
        const float dkm = sF1[row * LDF + cl] + dkd[t];
        const float dki = sF2[row * LDF + cl];
        const float att = dad[t * 16 + t];
        x[t] = qv[t] * dqm - kv[t] * dkm;
        y[t] = run_y;  // exclusive prefix sum of k dk_inter inside the block
        run_y += kv[t] * dki;
        dqd[t] = dqm + att * kv[t];
        dkd[t] = dkm + dki + att * qv[t];
      }
      CUTE_UNROLL
      for (int t = 15; t >= 0; --t) {
        run_x += x[t];
        x[t] = run_x;  // inclusive suffix sum inside the block
      }
      sScan[d * 64 + cl] = run_x;
      sScan[256 + d * 64 + cl] = run_y;
    }
    __syncthreads();
    float offx = 0.f, offy = 0.f;
    CUTE_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (j > d) offx += sScan[j * 64 + cl];
      if (j < d) offy += sScan[256 + j * 64 + cl];
    }
    const float dgc = sDGH[cl];
    const int64_t base = kout + int64_t(16 * d) * HK + cl;
    T* dq = static_cast<T*>(p.dq) + base;
    T* dk = static_cast<T*>(p.dk) + base;
    GT* dg = static_cast<GT*>(p.dg) + base;
    CUTE_UNROLL
    for (int t = 0; t < 16; ++t)
      if (16 * d + t < rows) {
        dq[t * HK] = T(dqd[t]);
        dk[t * HK] = T(dkd[t]);
        dg[t * HK] = (clamped >> t) & 1u ? GT(0.f) : GT((x[t] + offx) + (y[t] + offy) + dgc);
      }
  }
};

template <class T, class GT>
__global__ void __launch_bounds__(chunk_bwd_cfg::kThreads, 2) chunk_bwd_dqkg_kernel(const BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Dqkg<T, GT>::run(p, smem);
}

}  // namespace chunk_bwd_detail
}  // namespace gla
