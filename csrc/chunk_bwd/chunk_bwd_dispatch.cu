// Host-side coverage check and launches of the chunked backward.
#include "chunk_bwd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cute/numeric/numeric_types.hpp>

#include "chunk_bwd_config.h"

namespace gla {

const char* chunk_bwd_unsupported(const BwdParams& p, int sm_major, int sm_minor) {
  (void)sm_minor;
  if (sm_major < 8) return "chunk_bwd needs sm_80 or newer";
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return "chunk_bwd needs bfloat16 or float16 q/k/v";
  if (p.g_dtype != DType::kFloat32 && p.g_dtype != p.dtype)
    return "chunk_bwd needs g in float32 or in the dtype of q/k/v";
  if (p.K != 64 && p.K != 128 && p.K != 256) return "chunk_bwd needs K in {64, 128, 256}";
  if (p.V <= 0 || p.V % 64 != 0 || p.V > 512) return "chunk_bwd needs V a multiple of 64, at most 512";
  if (p.H <= 0 || p.H > 65535 || p.N < 0 || p.T < 0) return "chunk_bwd: bad sizes (at most 65535 heads)";
  if (p.cu_seqlens != nullptr && p.B != 1) return "chunk_bwd: cu_seqlens needs B == 1";
  if (p.cu_seqlens == nullptr && p.N != p.B) return "chunk_bwd: N must equal B without cu_seqlens";
  if (int64_t(p.N) * p.H * (p.K / 64) * (p.V / 64) > 0x7fffffffLL ||
      (int64_t(p.B) * p.T / 64 + p.N) * (p.K / 64 > p.V / 64 ? p.K / 64 : p.V / 64) > 0x7fffffffLL)
    return "chunk_bwd: too many tiles for one grid";
  const void* ptrs[] = {p.q, p.k, p.v, p.g, p.dout, p.dq, p.dk, p.dg, p.dv, p.dht, p.dh0,
                        p.saved_a, p.saved_qx, p.saved_kd, p.saved_decay, p.saved_h, p.dh};
  for (const void* x : ptrs)
    if (x != nullptr && !aligned16(x)) return "chunk_bwd needs 16-byte aligned tensors";
  int dev = 0, max_smem = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "chunk_bwd: cannot query the device";
  const int smem = std::max({chunk_bwd_cfg::DqkgSmem{}.bytes(), chunk_bwd_cfg::DvSmem{p.K}.bytes(),
                             chunk_bwd_cfg::WalkSmem{}.bytes()});
  if (smem > max_smem) return "chunk_bwd needs more shared memory per block than this GPU has";
  return nullptr;
}

namespace {
// The dh walk's segment split and where its pieces go in the workspace (states, then decays).
struct WorkspacePlan {
  SegmentSplit sp;
  size_t at_decay = 0, bytes = 0;
};

// GLA_CUDA_DH_SPLIT=0 turns the dh walk's segment split off (A/B measurements).
bool dh_split_allowed() {
  const char* v = std::getenv("GLA_CUDA_DH_SPLIT");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

WorkspacePlan plan_workspace(const BwdParams& p) {
  WorkspacePlan w;
  if (dh_split_allowed()) w.sp = plan_dh_split(p);
  if (w.sp.seg_len > 0) {
    const size_t n = size_t(p.N) * p.H * w.sp.nseg * p.K;
    w.at_decay = (n * p.V * sizeof(float) + 255) / 256 * 256;
    w.bytes = w.at_decay + n * sizeof(float);
  }
  return w;
}

// The three launches: the dh walk (two with a split), dv, dq/dk/dg.
template <class T>
cudaError_t run_all(const BwdParams& p, const SegmentSplit& sp, cudaStream_t stream) {
  cudaError_t err = run_chunk_bwd_dh<T>(p, sp, stream);
  if (err != cudaSuccess) return err;
  switch (p.K) {
    case 64: err = run_chunk_bwd_dv<T, 64>(p, stream); break;
    case 128: err = run_chunk_bwd_dv<T, 128>(p, stream); break;
    case 256: err = run_chunk_bwd_dv<T, 256>(p, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  return p.g_dtype == DType::kFloat32 ? run_chunk_bwd_dqkg<T, float>(p, stream) : run_chunk_bwd_dqkg<T, T>(p, stream);
}
}  // namespace

size_t chunk_bwd_workspace_bytes(const BwdParams& p) { return plan_workspace(p).bytes; }

cudaError_t chunk_bwd(const BwdParams& p, void* workspace, cudaStream_t stream) {
  const WorkspacePlan w = plan_workspace(p);
  SegmentSplit sp = w.sp;
  if (sp.seg_len > 0) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    sp.ws_state = static_cast<float*>(workspace);
    sp.ws_decay = reinterpret_cast<float*>(static_cast<char*>(workspace) + w.at_decay);
  }
  switch (p.dtype) {
    case DType::kBFloat16: return run_all<cute::bfloat16_t>(p, sp, stream);
    case DType::kFloat16: return run_all<cute::half_t>(p, sp, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gla
