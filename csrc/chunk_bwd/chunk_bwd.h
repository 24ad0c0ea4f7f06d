// Chunked GLA backward from the training forward's intermediates (CUTLASS/CuTe, sm_80+): the dh
// walk, dv, then dq/dk/dg (docs/kernels/chunk_bwd.md).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "gla_params.h"

namespace gla {
// Returns nullptr if these kernels cover the inputs, else a short static reason string.
const char* chunk_bwd_unsupported(const BwdParams& p, int sm_major, int sm_minor);
// Bytes of device workspace chunk_bwd needs (the dh walk's segment split; 0 without one).
size_t chunk_bwd_workspace_bytes(const BwdParams& p);
// Launches on `stream`; returns the launch error (cudaGetLastError after the launches).
cudaError_t chunk_bwd(const BwdParams& p, void* workspace, cudaStream_t stream);
}  // namespace gla
