// Instantiations of the fused chunked forward for bf16 inputs, K = 128 (gate in float32 or bf16).
#include "chunk_fwd_fused_sm80_launch.cuh"

namespace gla {
template cudaError_t run_chunk_fwd<cute::bfloat16_t, float, 128, 64>(const FwdParams&, const chunk_fwd_cfg::Split&, cudaStream_t);
template cudaError_t run_chunk_fwd<cute::bfloat16_t, cute::bfloat16_t, 128, 64>(const FwdParams&, const chunk_fwd_cfg::Split&, cudaStream_t);
template cudaError_t run_chunk_fwd<cute::bfloat16_t, float, 128, 128>(const FwdParams&, const chunk_fwd_cfg::Split&, cudaStream_t);
template cudaError_t run_chunk_fwd<cute::bfloat16_t, cute::bfloat16_t, 128, 128>(const FwdParams&, const chunk_fwd_cfg::Split&, cudaStream_t);
}  // namespace gla
