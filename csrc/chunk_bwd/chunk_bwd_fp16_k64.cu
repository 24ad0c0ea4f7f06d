// Instantiations of the chunked backward for fp16 inputs, K = 64 (gate in float32 or fp16).
#include "chunk_bwd_launch.cuh"

namespace gla {
template cudaError_t run_chunk_bwd<cute::half_t, float, 64>(const BwdParams&, cudaStream_t);
template cudaError_t run_chunk_bwd<cute::half_t, cute::half_t, 64>(const BwdParams&, cudaStream_t);
}  // namespace gla
