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
  kernel<<<grid, chunk_bwd_cfg::kThreads, Kern::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gla
