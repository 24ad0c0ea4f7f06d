// Fused chunked GLA forward (CUTLASS/CuTe, sm_80+). See chunk_fwd_kernel.cuh for the design.
#pragma once

#include <cuda_runtime.h>

#include "gla_params.h"

namespace gla {
// Returns nullptr if this kernel covers the inputs, else a short static reason string.
const char* chunk_fwd_unsupported(const FwdParams& p, int sm_major, int sm_minor);
// Launches on `stream`; returns the launch error (cudaGetLastError after the launch).
cudaError_t chunk_fwd(const FwdParams& p, cudaStream_t stream);
}  // namespace gla
