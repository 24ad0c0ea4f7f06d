// Instantiations of the chunked backward for bf16 inputs, K = 128 (gate in float32 or bf16).
#include "chunk_bwd_launch.cuh"

namespace gla {
template cudaError_t run_chunk_bwd<cute::bfloat16_t, float, 128>(const BwdParams&, cudaStream_t);
template cudaError_t run_chunk_bwd<cute::bfloat16_t, cute::bfloat16_t, 128>(const BwdParams&, cudaStream_t);
}  // namespace gla
