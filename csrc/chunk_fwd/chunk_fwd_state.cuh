// Shared by the chunked forward's sequence walks (the fused kernel and the two-stage walks): the
// register-resident state's initial value (rS, tUc and kT as in state_tile.cuh, which has its
// stores), the output store, the launch.
#pragma once

#include <cute/tensor.hpp>

#include "chunk_fwd_config.h"
#include "device_common.cuh"
#include "gla_params.h"
#include "state_tile.cuh"

namespace gla {

// h0 (or zero), then, in pass 2 of a split, the end states of the segments before `seg`
// composed in order: S = exp(sum g over segment j) S + S_j.
template <int K, int BV, bool kT = false, class Frag, class Coord>
__device__ __forceinline__ void load_initial_state(const FwdParams& p, const chunk_fwd_cfg::Split& sp, int64_t nh,
                                                   int vt, int seg, Frag& rS, const Coord& tUc) {
  using namespace cute;
  constexpr int step = kT ? 1 : 2;  // float2 loads where the pairs are adjacent columns
  if (p.h0 != nullptr) {
    const float* h0 = p.h0 + nh * K * p.V + int64_t(vt) * BV;
    CUTE_UNROLL
    for (int i = 0; i < size(rS); i += step) {
      const float* src = h0 + state_offset<kT>(tUc, i, p.V);
      if constexpr (kT) {
        rS(i) = *src;
      } else {
        const float2 x = *reinterpret_cast<const float2*>(src);
        rS(i) = x.x;
        rS(i + 1) = x.y;
      }
    }
  } else {
    clear(rS);
  }
  for (int j = 0; j < seg; ++j) {
    const float* Sj = sp.ws_state + (nh * sp.nseg + j) * K * p.V + int64_t(vt) * BV;
    const float* Dj = sp.ws_decay + (nh * sp.nseg + j) * K;
    CUTE_UNROLL
    for (int i = 0; i < size(rS); i += step) {
      const float dk = Dj[get<kT ? 1 : 0>(tUc(i))];
      const float* src = Sj + state_offset<kT>(tUc, i, p.V);
      if constexpr (kT) {
        rS(i) = dk * rS(i) + *src;
      } else {
        const float2 x = *reinterpret_cast<const float2*>(src);
        rS(i) = dk * rS(i) + x.x;
        rS(i + 1) = dk * rS(i + 1) + x.y;
      }
    }
  }
}

// One chunk's output tile (C x BV rows of o, row stride ld; acc the float32 accumulator of the
// MMA thread slice thr): the rows below `rows`, two columns per 32-bit store.
template <class T, int C, int BV, class ThrMma, class Acc>
__device__ __forceinline__ void store_output(T* o, int64_t ld, int rows, const ThrMma& thr, const Acc& acc) {
  using namespace cute;
  Tensor tOg = thr.partition_C(make_tensor(make_gmem_ptr(o), make_layout(Shape<Int<C>, Int<BV>>{}, make_stride(ld, _1{}))));
  Tensor tOc = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2)
    if (get<0>(tOc(i)) < rows) *reinterpret_cast<uint32_t*>(&tOg(i)) = pack2<T>(acc(i), acc(i + 1));
}

// A walk's grid: (sequence x head, V / BV tiles, segments).
inline dim3 walk_grid(const FwdParams& p, const chunk_fwd_cfg::Split& sp, int BV) {
  return dim3(unsigned(p.N) * unsigned(p.H), unsigned(p.V / BV), sp.seg_len > 0 ? unsigned(sp.nseg) : 1u);
}

// Launches a walk kernel(p, split) over walk_grid, 8 warps per CTA.
template <class Kernel>
cudaError_t launch_walk(Kernel* kernel, int smem, int BV, const FwdParams& p, const chunk_fwd_cfg::Split& sp,
                        cudaStream_t stream) {
  const dim3 grid = walk_grid(p, sp, BV);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, chunk_fwd_cfg::kThreads, smem, stream>>>(p, sp);
  return cudaGetLastError();
}

}  // namespace gla
