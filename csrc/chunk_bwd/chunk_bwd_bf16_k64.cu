// Instantiations of the chunked backward for bf16 inputs, K = 64 (gate in float32 or bf16).
#include "chunk_bwd_launch.cuh"

namespace gla {
template cudaError_t run_chunk_bwd<cute::bfloat16_t, float, 64>(const BwdParams&, cudaStream_t);
template cudaError_t run_chunk_bwd<cute::bfloat16_t, cute::bfloat16_t, 64>(const BwdParams&, cudaStream_t);
}  // namespace gla
