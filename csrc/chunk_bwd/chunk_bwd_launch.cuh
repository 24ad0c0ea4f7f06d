// Launch templates of the chunked backward: the dh walk, dv, dq/dk/dg.
#pragma once

#include <cuda_runtime.h>

#include "chunk_bwd_config.h"
#include "chunk_bwd_dh.cuh"
#include "chunk_bwd_dqkg.cuh"
#include "chunk_bwd_dv.cuh"

namespace gla {

namespace chunk_bwd_detail {
template <class Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, int smem, const BwdParams& p, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}
}  // namespace chunk_bwd_detail

template <class T>
cudaError_t run_chunk_bwd_dh(const BwdParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.N) * unsigned(p.H) * unsigned(p.K / 64) * unsigned(p.V / 64));
  return chunk_bwd_detail::launch(&chunk_bwd_detail::chunk_bwd_dh_kernel<T>, grid, chunk_bwd_cfg::kWalkThreads,
                                  chunk_bwd_cfg::WalkSmem{}.bytes(), p, stream);
}

template <class T, int K>
cudaError_t run_chunk_bwd_dv(const BwdParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.num_slots * (p.V / 64)), unsigned(p.H));
  return chunk_bwd_detail::launch(&chunk_bwd_detail::chunk_bwd_dv_kernel<T, K>, grid, chunk_bwd_cfg::kDvThreads,
                                  chunk_bwd_cfg::DvSmem{K}.bytes(), p, stream);
}

template <class T, class GT>
cudaError_t run_chunk_bwd_dqkg(const BwdParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.num_slots * (p.K / 64)), unsigned(p.H));
  return chunk_bwd_detail::launch(&chunk_bwd_detail::chunk_bwd_dqkg_kernel<T, GT>, grid, chunk_bwd_cfg::kThreads,
                                  chunk_bwd_cfg::DqkgSmem{}.bytes(), p, stream);
}

}  // namespace gla
