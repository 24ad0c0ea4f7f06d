// Instantiations of the chunked backward for float16 inputs: dq/dk/dg (gate in
// float32 or float16).
#include "chunk_bwd_sm80_launch.cuh"

namespace gla {
template cudaError_t run_chunk_bwd_dqkg<cute::half_t, float>(const BwdParams&, cudaStream_t);
template cudaError_t run_chunk_bwd_dqkg<cute::half_t, cute::half_t>(const BwdParams&, cudaStream_t);
}  // namespace gla
