// Fused chunked GLA backward (CUTLASS/CuTe, sm_80+). See chunk_bwd_kernel.cuh for the design.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "gla_params.h"

namespace gla {
// Returns nullptr if these kernels cover the inputs, else a short static reason string.
const char* chunk_bwd_unsupported(const BwdParams& p, int sm_major, int sm_minor);
// Float32 elements of the state workspace (BwdParams::ws) for these shapes.
int64_t chunk_bwd_workspace_floats(const BwdParams& p);
// Whether dq, dk and dg come back as float32 partials per V tile (BwdParams::partials):
// several V tiles on a GPU without thread-block clusters (before sm_90).
bool chunk_bwd_needs_partials(const BwdParams& p, int sm_major);
int chunk_bwd_v_tiles(const BwdParams& p);
// Launches on `stream`; returns the launch error (cudaGetLastError after the launches).
cudaError_t chunk_bwd(const BwdParams& p, cudaStream_t stream);
}  // namespace gla
