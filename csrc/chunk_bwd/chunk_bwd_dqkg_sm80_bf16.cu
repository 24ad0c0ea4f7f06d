// Instantiations of the chunked backward for bf16 inputs: dq/dk/dg (gate in
// float32 or bf16).
#include "chunk_bwd_sm80_launch.cuh"

namespace gla {
template cudaError_t run_chunk_bwd_dqkg<cute::bfloat16_t, float>(const BwdParams&, cudaStream_t);
template cudaError_t run_chunk_bwd_dqkg<cute::bfloat16_t, cute::bfloat16_t>(const BwdParams&, cudaStream_t);
}  // namespace gla
