// Instantiations of the fused chunked forward for fp16 inputs, K = 64 (gate in float32 or fp16).
#include "chunk_fwd_fused_sm80_launch.cuh"

namespace gla {
template cudaError_t run_chunk_fwd<cute::half_t, float, 64, 64>(const FwdParams&, const chunk_fwd_cfg::Split&, cudaStream_t);
template cudaError_t run_chunk_fwd<cute::half_t, cute::half_t, 64, 64>(const FwdParams&, const chunk_fwd_cfg::Split&, cudaStream_t);
}  // namespace gla
