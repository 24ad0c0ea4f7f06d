// Launch templates of the chunked backward: the dh walk, dv, dq/dk/dg.
#pragma once

#include <cuda_runtime.h>

#include "chunk_bwd_config.h"
#include "chunk_bwd_dh_sm80.cuh"
#include "chunk_bwd_dqkg_sm80.cuh"
#include "chunk_bwd_dv_sm80.cuh"

namespace gla {

namespace chunk_bwd_detail {
template <class Kernel, class... Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cudaGetLastError();
}
}  // namespace chunk_bwd_detail

template <class T>
cudaError_t run_chunk_bwd_dh(const BwdParams& p, const SegmentSplit& sp, cudaStream_t stream) {
  const unsigned walks = unsigned(p.N) * unsigned(p.H) * unsigned(p.K / 64) * unsigned(p.V / 64);
  constexpr int kSmem = chunk_bwd_cfg::WalkSmem{}.bytes();
  if (sp.seg_len > 0) {  // pass 1: every segment but the first
    const cudaError_t err = chunk_bwd_detail::launch(&chunk_bwd_detail::chunk_bwd_dh_kernel<T, true>,
                                                     dim3(walks, unsigned(sp.nseg - 1)), chunk_bwd_cfg::kWalkThreads,
                                                     kSmem, stream, p, sp);
    if (err != cudaSuccess) return err;
  }
  return chunk_bwd_detail::launch(&chunk_bwd_detail::chunk_bwd_dh_kernel<T, false>,
                                  dim3(walks, sp.seg_len > 0 ? unsigned(sp.nseg) : 1u), chunk_bwd_cfg::kWalkThreads,
                                  kSmem, stream, p, sp);
}

template <class T, int K>
cudaError_t run_chunk_bwd_dv(const BwdParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.num_slots * (p.V / 64)), unsigned(p.H));
  return chunk_bwd_detail::launch(&chunk_bwd_detail::chunk_bwd_dv_kernel<T, K>, grid, chunk_bwd_cfg::kDvThreads,
                                  chunk_bwd_cfg::DvSmem{K}.bytes(), stream, p);
}

template <class T, class GT>
cudaError_t run_chunk_bwd_dqkg(const BwdParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.num_slots * (p.K / 64)), unsigned(p.H));
  return chunk_bwd_detail::launch(&chunk_bwd_detail::chunk_bwd_dqkg_kernel<T, GT>, grid, chunk_bwd_cfg::kThreads,
                                  chunk_bwd_cfg::DqkgSmem{}.bytes(), stream, p);
}

}  // namespace gla
