// Instantiations of the chunked backward for bf16 inputs: the dh walk and dv.
#include "chunk_bwd_sm80_launch.cuh"

namespace gla {
template cudaError_t run_chunk_bwd_dh<cute::bfloat16_t>(const BwdParams&, const SegmentSplit&, cudaStream_t);
template cudaError_t run_chunk_bwd_dv<cute::bfloat16_t, 64>(const BwdParams&, cudaStream_t);
template cudaError_t run_chunk_bwd_dv<cute::bfloat16_t, 128>(const BwdParams&, cudaStream_t);
template cudaError_t run_chunk_bwd_dv<cute::bfloat16_t, 256>(const BwdParams&, cudaStream_t);
}  // namespace gla
