// Host-side coverage check and dispatch of the chunked backward.
#include "chunk_bwd.h"

#include <cstdint>

#include <cute/numeric/numeric_types.hpp>

#include "chunk_bwd_config.h"

namespace gla {

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <class T, int K>
cudaError_t dispatch_g(const BwdParams& p, cudaStream_t stream) {
  if (p.g_dtype == DType::kFloat32) return run_chunk_bwd<T, float, K>(p, stream);
  return run_chunk_bwd<T, T, K>(p, stream);
}

template <class T>
cudaError_t dispatch_k(const BwdParams& p, cudaStream_t stream) {
  switch (p.K) {
    case 64: return dispatch_g<T, 64>(p, stream);
    case 128: return dispatch_g<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

const char* chunk_bwd_unsupported(const BwdParams& p, int sm_major, int sm_minor) {
  (void)sm_minor;
  if (sm_major < 8) return "chunk_bwd needs sm_80 or newer";
  // dh and the gated operands of its products are kept in the input dtype: in float16, gates
  // near -20 per step put them (and with them dh0 and dg) below its range
  if (p.dtype != DType::kBFloat16)
    return "chunk_bwd needs bfloat16 q/k/v (in float16, strong gates put dh below its range)";
  if (p.g_dtype != DType::kFloat32 && p.g_dtype != p.dtype)
    return "chunk_bwd needs g in float32 or in the dtype of q/k/v";
  if (p.K != 64 && p.K != 128) return "chunk_bwd needs K in {64, 128}";
  if (p.V <= 0 || p.V % chunk_bwd_cfg::kBV != 0 || p.V > 512)
    return "chunk_bwd needs V a multiple of 64, at most 512";
  if (p.H <= 0 || p.N < 0 || p.T < 0) return "chunk_bwd: bad sizes";
  if (p.cu_seqlens != nullptr && p.B != 1) return "chunk_bwd: cu_seqlens needs B == 1";
  if (p.cu_seqlens == nullptr && p.N != p.B) return "chunk_bwd: N must equal B without cu_seqlens";
  if (int64_t(p.N) * p.H > 0x7fffffffLL) return "chunk_bwd: too many (sequence, head) pairs";
  const void* ptrs[] = {p.q, p.k, p.v, p.g, p.dout, p.dq, p.dk, p.dg, p.dv, p.h0, p.dht, p.dh0, p.ws};
  for (const void* x : ptrs)
    if (x != nullptr && !aligned16(x)) return "chunk_bwd needs 16-byte aligned tensors";
  int dev = 0, max_smem = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "chunk_bwd: cannot query the device";
  if (chunk_bwd_cfg::smem_bytes(p.K) > max_smem) return "chunk_bwd needs more shared memory per block than this GPU has";
  return nullptr;
}

int64_t chunk_bwd_workspace_floats(const BwdParams& p) {
  return chunk_bwd_cfg::n_slots(p.N, int64_t(p.B) * p.T) * p.H * p.K * p.V;
}

int chunk_bwd_v_tiles(const BwdParams& p) { return p.V / chunk_bwd_cfg::kBV; }

bool chunk_bwd_needs_partials(const BwdParams& p, int sm_major) { return chunk_bwd_v_tiles(p) > 1 && sm_major < 9; }

cudaError_t chunk_bwd(const BwdParams& params, cudaStream_t stream) {
  BwdParams p = params;
  const int tiles = chunk_bwd_v_tiles(p);
  p.cluster = tiles > 1 && !p.partials ? tiles : 0;
  if (p.dtype == DType::kBFloat16) return dispatch_k<cute::bfloat16_t>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gla
