// State walk of the chunked backward: the state entering every chunk, float32, into the
// workspace (slot layout: chunk_bwd_config.h). One CTA (8 warps) per (sequence, head, V tile
// of 64); the K x 64 state lives in registers (MMA accumulators). Per chunk: k, g, v by
// cp.async (rows past the sequence end zero-filled), store S, then
// S = exp(G) S + (k exp(G - b))^T v with b the in-chunk cumulative sum of g (exponents <= 0).
#pragma once

#include <cute/tensor.hpp>

#include "cute_gemm.cuh"
#include "device_common.cuh"
#include "chunk_bwd_config.h"

namespace gla {
namespace chunk_bwd_detail {

using namespace cute;

template <class T, class GT, int K>
struct States {
  static constexpr int C = chunk_bwd_cfg::kChunk, NT = chunk_bwd_cfg::kThreads, BV = chunk_bwd_cfg::kBV;
  static constexpr chunk_bwd_cfg::StatesSmem L{K};
  static constexpr int LDQ = L.ldq(), LDV = L.ldv(), LDKT = L.ldkt(), TPC = L.tpc(), RPT = C / TPC;
  static constexpr int kSmem = L.bytes();
  static constexpr int kMinBlocks = K == 64 ? 2 : 1;  // K = 64: <= 128 registers, 2 CTAs per SM
  static_assert(K == 64 || K == 128, "K in {64, 128}");

  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  using MmaU = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));

  static __device__ void run(const BwdParams& p, unsigned char* smem) {
    T* sK = reinterpret_cast<T*>(smem + L.off_k());
    GT* sG = reinterpret_cast<GT*>(smem + L.off_b());
    T* sV = reinterpret_cast<T*>(smem + L.off_v());
    T* sKT = reinterpret_cast<T*>(smem + L.off_kt());
    float* sGam = reinterpret_cast<float*>(smem + L.off_gam());
    float* sTot = reinterpret_cast<float*>(smem + L.off_tot());

    const int tid = threadIdx.x;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H, vt = blockIdx.y;
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    const int64_t len = eos > bos ? eos - bos : 0;
    const int nchunks = int((len + C - 1) / C);
    const int64_t HK = int64_t(p.H) * K, HV = int64_t(p.H) * p.V;
    const T* kb = static_cast<const T*>(p.k) + bos * HK + int64_t(h) * K;
    const GT* gb = static_cast<const GT*>(p.g) + bos * HK + int64_t(h) * K;
    const T* vb = static_cast<const T*>(p.v) + bos * HV + int64_t(h) * p.V + vt * BV;
    auto rows_in = [&](int c) { return int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C); };
    auto load_kg = [&](int c) {
      load_tile<NT, C, K>(sK, LDQ, kb + int64_t(c) * C * HK, HK, rows_in(c), tid);
      load_tile<NT, C, K>(sG, K, gb + int64_t(c) * C * HK, HK, rows_in(c), tid);
    };
    auto load_v = [&](int c) { load_tile<NT, C, BV>(sV, LDV, vb + int64_t(c) * C * HV, HV, rows_in(c), tid); };

    MmaU mma;
    auto thr = mma.get_thread_slice(tid);
    Tensor rS = partition_fragment_C(mma, Shape<Int<K>, Int<BV>>{});
    Tensor tc = thr.partition_C(make_identity_tensor(Shape<Int<K>, Int<BV>>{}));
    const int64_t state_off = (int64_t(n) * p.H + h) * K * p.V + int64_t(vt) * BV;
    if (p.h0 != nullptr) {
      CUTE_UNROLL
      for (int i = 0; i < size(rS); i += 2) {
        const float2 x = *reinterpret_cast<const float2*>(p.h0 + state_off + int64_t(get<0>(tc(i))) * p.V + get<1>(tc(i)));
        rS(i) = x.x;
        rS(i + 1) = x.y;
      }
    } else {
      clear(rS);
    }
    if (nchunks > 0) {
      load_kg(0);
      load_v(0);
      cp_async_commit();
    }
    for (int c = 0; c < nchunks; ++c) {
      cp_async_wait<0>();
      __syncthreads();
      if (c + 1 < nchunks) {  // the chunk after next comes through L2
        const int64_t t1 = int64_t(c + 1) * C;
        prefetch_rows<NT>(kb + t1 * HK, rows_in(c + 1), K * int(sizeof(T)), HK * int(sizeof(T)), tid);
        prefetch_rows<NT>(gb + t1 * HK, rows_in(c + 1), K * int(sizeof(GT)), HK * int(sizeof(GT)), tid);
        prefetch_rows<NT>(vb + t1 * HV, rows_in(c + 1), BV * int(sizeof(T)), HV * int(sizeof(T)), tid);
      }
      {  // the state entering chunk c
        float* hs = p.ws + (chunk_bwd_cfg::slot(n, bos, c) * p.H + h) * K * p.V + int64_t(vt) * BV;
        CUTE_UNROLL
        for (int i = 0; i < size(rS); i += 2)
          *reinterpret_cast<float2*>(hs + int64_t(get<0>(tc(i))) * p.V + get<1>(tc(i))) = make_float2(rS(i), rS(i + 1));
      }
      {  // per channel: cumsum of g, exp(G), (k exp(G - b))^T
        const int ch = tid % K, sg = tid / K;
        float gv[RPT];
        const float2 cs = chunk_cumsum<RPT, TPC>(sG, K, ch, sg, C, sTot, K, gv);
        const float off = cs.x, gam = cs.y;
        const float gam2 = gam * kLog2e;
        if (sg == 0) sGam[ch] = ex2(gam2);
        CUTE_UNROLL
        for (int r = 0; r < RPT; r += 2) {
          const int t = sg * RPT + r;
          const float b0 = (gv[r] + off) * kLog2e, b1 = (gv[r + 1] + off) * kLog2e;
          const float k0 = float(sK[t * LDQ + ch]) * ex2(gam2 - b0);
          const float k1 = float(sK[(t + 1) * LDQ + ch]) * ex2(gam2 - b1);
          *reinterpret_cast<uint32_t*>(sKT + ch * LDKT + t) = pack2<T>(k0, k1);
        }
      }
      __syncthreads();  // k, g no longer read
      if (c + 1 < nchunks) {
        load_kg(c + 1);
        cp_async_commit();
      }
      {  // S = exp(G) S + kg^T v
        CUTE_UNROLL
        for (int i = 0; i < size(rS); ++i) rS(i) *= sGam[get<0>(tc(i))];
        Tensor sKTf = make_tensor(make_smem_ptr(sKT), make_layout(Shape<Int<K>, Int<C>>{}, make_stride(Int<LDKT>{}, _1{})));
        Tensor sVt = make_tensor(make_smem_ptr(sV), make_layout(Shape<Int<BV>, Int<C>>{}, make_stride(_1{}, Int<LDV>{})));
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mma, sKTf, sVt, rS, tid);
      }
      __syncthreads();  // v, kg^T, exp(G) no longer read
      if (c + 1 < nchunks) {
        load_v(c + 1);
        cp_async_commit();
      }
    }
  }
};

template <class T, class GT, int K>
__global__ void __launch_bounds__(chunk_bwd_cfg::kThreads, States<T, GT, K>::kMinBlocks) chunk_bwd_states_kernel(const BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  States<T, GT, K>::run(p, smem);
}

}  // namespace chunk_bwd_detail
}  // namespace gla
