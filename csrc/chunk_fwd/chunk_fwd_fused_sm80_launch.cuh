// Launch template of the fused chunked forward: grid, block, dynamic shared memory.
#pragma once

#include <cuda_runtime.h>

#include "chunk_fwd_config.h"
#include "chunk_fwd_fused_sm80.cuh"

namespace gla {

// kSave: the kernel that also keeps the backward's intermediates (training, intermediates.h);
// kPool: the ones whose states are pool slots (serving prefill, chunk_fwd_cfg::PoolWalk). Each is its
// own instantiation, so that the plain forward carries none of that code. K = 256 runs the
// two-stage forward instead (chunk_fwd_dispatch.cu), whose kernels keep the same intermediates.
template <class T, class GT, int K, int BV, bool kSave, int kPool>
cudaError_t launch_chunk_fwd(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream) {
  constexpr int smem = chunk_fwd_detail::Kernel<T, GT, K, BV, kSave, kPool>::kSmem;
  static_assert(smem == chunk_fwd_cfg::smem_bytes(K, BV), "smem layout mismatch");
  return launch_walk(&chunk_fwd_detail::chunk_fwd_kernel<T, GT, K, BV, kSave, kPool>, smem, BV, p, split, stream);
}

template <class T, class GT, int K, int BV>
cudaError_t run_chunk_fwd(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream) {
  return chunk_fwd_cfg::launch_walk_for(p, p.save_a != nullptr, [&](auto save, auto pool) {
    return launch_chunk_fwd<T, GT, K, BV, decltype(save)::value, decltype(pool)::value>(p, split, stream);
  });
}

}  // namespace gla
