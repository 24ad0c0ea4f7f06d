// GLA as a recurrence, one token at a time (decoding, short inputs, pooled serving states).
// See recurrent_tile.cuh for the design.
#pragma once

#include <cuda_runtime.h>

#include "gla_params.h"

namespace gla {

// The backward recomputes the state before every token from the initial one (exact dg
// without storing T states): O(T^2) work, so it takes sequences of at most this many tokens.
constexpr int kRecurrentBwdMaxT = 16;

// nullptr if the recurrent kernels cover these sizes, else a short static reason.
// T is the (packed) sequence length; only the backward limits it.
const char* recurrent_unsupported(bool backward, int T, int K, int V, int sm_major);
// Launch on `stream`; return the launch error (cudaGetLastError after the launch).
cudaError_t recurrent_fwd(const RecurrentParams& p, cudaStream_t stream);
cudaError_t recurrent_bwd(const RecurrentParams& p, cudaStream_t stream);

}  // namespace gla
