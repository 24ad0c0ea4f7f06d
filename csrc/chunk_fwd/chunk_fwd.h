// Chunked GLA forward (CUTLASS/CuTe, sm_80+): the fused kernel (chunk_fwd_fused_sm80.cuh) for K <= 128,
// the two-stage one (chunk_fwd_twostage_prep.cu, chunk_fwd_twostage_walk_sm{80,90}.cu) for K = 256.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "gla_params.h"

namespace gla {
// Returns nullptr if this kernel covers the inputs, else a short static reason string.
const char* chunk_fwd_unsupported(const FwdParams& p, int sm_major, int sm_minor);
// Device memory the forward needs besides its inputs and outputs (segment states of a split,
// the two-stage intermediates); the caller allocates it (torch's caching allocator: no
// cudaMalloc and no synchronisation per call).
size_t chunk_fwd_workspace_bytes(const FwdParams& p);
// Launches on `stream`; `workspace`: chunk_fwd_workspace_bytes(p) bytes, 256-byte aligned (may be
// nullptr when that is 0). Returns the launch error (cudaGetLastError after the launch).
cudaError_t chunk_fwd(const FwdParams& p, void* workspace, cudaStream_t stream);
}  // namespace gla
