// Launch template of the chunked backward: the state walk, then the reverse kernel.
#pragma once

#include <cuda_runtime.h>

#include "chunk_bwd_config.h"
#include "chunk_bwd_kernel.cuh"
#include "chunk_bwd_states.cuh"

namespace gla {

template <class T, class GT, int K>
cudaError_t run_chunk_bwd(const BwdParams& p, cudaStream_t stream) {
  using Kern = chunk_bwd_detail::Kernel<T, GT, K>;
  using States = chunk_bwd_detail::States<T, GT, K>;
  static_assert(Kern::kSmem == chunk_bwd_cfg::smem_bytes(K), "smem layout mismatch");
  static_assert(States::kSmem == chunk_bwd_cfg::states_smem_bytes(K), "smem layout mismatch");
  // One CTA per (sequence, head) in x, per V tile in y.
  const dim3 grid(unsigned(p.N) * unsigned(p.H), unsigned(p.V / chunk_bwd_cfg::kBV));
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  auto states = &chunk_bwd_detail::chunk_bwd_states_kernel<T, GT, K>;
  auto kernel = &chunk_bwd_detail::chunk_bwd_kernel<T, GT, K>;
  cudaError_t err = cudaFuncSetAttribute(states, cudaFuncAttributeMaxDynamicSharedMemorySize, States::kSmem);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kern::kSmem);
  if (err != cudaSuccess) return err;
  states<<<grid, chunk_bwd_cfg::kThreads, States::kSmem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.cluster > 1) {  // the V tiles of one (sequence, head) sum dq, dk, dg in a cluster
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(chunk_bwd_cfg::kThreads);
    cfg.dynamicSmemBytes = Kern::kSmem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = unsigned(p.cluster);
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaLaunchKernelEx(&cfg, kernel, p);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  }
  kernel<<<grid, chunk_bwd_cfg::kThreads, Kern::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gla
