// The backward's dv, from the training forward's intermediates and the dh walk:
//   dv = kd dh + A^T do,   kd = k exp(Gamma - b), A = scale tril(scores)   (both saved)
// One CTA (4 warps) per (chunk slot, head, 64-column tile of V); warp w owns the 16 rows
// (keys) 16 w .. and takes A^T's products from the query blocks w.. only (causal).
#pragma once

#include <cute/tensor.hpp>

#include "cute_gemm.cuh"
#include "device_common.cuh"
#include "state_tile.cuh"
#include "chunk_bwd_config.h"

namespace gla {
namespace chunk_bwd_detail {

using namespace cute;

template <class T, int K>
struct Dv {
  static constexpr int C = chunk_bwd_cfg::kChunk, NT = chunk_bwd_cfg::kDvThreads, BV = 64;
  static constexpr chunk_bwd_cfg::DvSmem L{K};
  static constexpr int LDK = L.ldk(), LD = L.ld();
  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  using Mma = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _1, _1>>{}, Tile<_64, _16, _16>{}));

  static __device__ void run(const BwdParams& p, unsigned char* smem) {
    const int tid = threadIdx.x, warp = tid / 32;
    // the V tiles of one slot are neighbours in the grid: they share kd and A through L2
    const int64_t slot = blockIdx.x / (p.V / BV);
    const int hh = blockIdx.y, vt = int(blockIdx.x % (p.V / BV));
    int n;
    int64_t t0;
    const int rows = slot_rows(p, slot, C, n, t0);
    if (rows == 0) return;
    T* sKd = reinterpret_cast<T*>(smem + L.off_kd());
    T* sDh = reinterpret_cast<T*>(smem + L.off_dh());
    T* sA = reinterpret_cast<T*>(smem + L.off_a());
    T* sDo = reinterpret_cast<T*>(smem + L.off_do());
    const int64_t HK = int64_t(p.H) * K, HV = int64_t(p.H) * p.V;
    load_tile<NT, C, K>(sKd, LDK, static_cast<const T*>(p.saved_kd) + t0 * HK + int64_t(hh) * K, HK, rows, tid);
    load_tile_from<NT, K, BV>(sDh, LD, static_cast<const typename KeptState<T>::type*>(p.dh) + (slot * p.H + hh) * K * p.V + vt * BV,
                              p.V, K, tid);
    load_tile<NT, C, C>(sA, LD, static_cast<const T*>(p.saved_a) + (t0 * p.H + hh) * C, int64_t(p.H) * C, rows, tid);
    T* dob = static_cast<T*>(p.dv) + t0 * HV + int64_t(hh) * p.V + vt * BV;
    load_tile<NT, C, BV>(sDo, LD, static_cast<const T*>(p.dout) + t0 * HV + int64_t(hh) * p.V + vt * BV, HV, rows, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    Mma mma;
    auto thr = mma.get_thread_slice(tid);
    Tensor acc = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});
    clear(acc);
    // kd (token, channel) x dh^T (column, channel), 64 channels at a time
    CUTE_UNROLL
    for (int kb = 0; kb < K / 64; ++kb)
      gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(
          mma, make_tensor(make_smem_ptr(sKd + kb * 64), make_layout(Shape<Int<C>, _64>{}, make_stride(Int<LDK>{}, _1{}))),
          make_tensor(make_smem_ptr(sDh + kb * 64 * LD), make_layout(Shape<Int<BV>, _64>{}, make_stride(_1{}, Int<LD>{}))),
          acc, tid);
    // A^T (key, query) x do^T (column, query): query blocks from the warp's own
    auto lT = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, Int<LD>{}));
    gemm_smem<SM75_U16x8_LDSM_T, SM75_U16x8_LDSM_T, T>(mma, make_tensor(make_smem_ptr(sA), lT),
                                                       make_tensor(make_smem_ptr(sDo), lT), acc, tid, warp);
    __syncthreads();  // do is no longer read: dv is staged in its place
    Tensor tc = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2)
      *reinterpret_cast<uint32_t*>(sDo + get<0>(tc(i)) * LD + get<1>(tc(i))) = pack2<T>(acc(i), acc(i + 1));
    __syncthreads();
    store_tile<NT, C, BV>(dob, HV, sDo, LD, rows, tid);
  }
};

template <class T, int K>
__global__ void __launch_bounds__(chunk_bwd_cfg::kDvThreads) chunk_bwd_dv_kernel(const BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Dv<T, K>::run(p, smem);
}

}  // namespace chunk_bwd_detail
}  // namespace gla
