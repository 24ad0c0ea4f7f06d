// Launch template of the fused chunked forward: grid, block, dynamic shared memory.
#pragma once

#include <cuda_runtime.h>

#include "chunk_fwd_config.h"
#include "chunk_fwd_kernel.cuh"

namespace gla {

// kSave: the kernel that also keeps the Triton backward's intermediates (training; its own
// instantiation, so that the plain forward carries none of that code). K = 256 runs the
// two-stage forward instead (chunk_fwd.cu), whose kernels keep the same intermediates.
template <class T, class GT, int K, int BV, bool kSave>
cudaError_t launch_chunk_fwd(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream) {
  constexpr int smem = chunk_fwd_detail::Kernel<T, GT, K, BV, kSave>::kSmem;
  static_assert(smem == chunk_fwd_cfg::smem_bytes(K, BV), "smem layout mismatch");
  // One CTA per (sequence, head) in x, per V-tile in y, per segment in z.
  const unsigned nseg = split.seg_len > 0 ? unsigned(split.nseg) : 1u;
  const dim3 grid(unsigned(p.N) * unsigned(p.H), unsigned(p.V / BV), nseg);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  auto* kernel = &chunk_fwd_detail::chunk_fwd_kernel<T, GT, K, BV, kSave>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, chunk_fwd_cfg::kThreads, smem, stream>>>(p, split);
  return cudaGetLastError();
}

template <class T, class GT, int K, int BV>
cudaError_t run_chunk_fwd(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream) {
  if (p.save_a == nullptr) return launch_chunk_fwd<T, GT, K, BV, false>(p, split, stream);
  return launch_chunk_fwd<T, GT, K, BV, true>(p, split, stream);
}

}  // namespace gla
