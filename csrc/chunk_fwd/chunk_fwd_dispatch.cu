// Host side of the chunked forward: coverage check, workspace plan, and dispatch to the fused
// kernel (K <= 128) or the two-stage one (K = 256), with the segment split's first pass.
#include "chunk_fwd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cute/numeric/numeric_types.hpp>

#include "chunk_fwd_config.h"

namespace gla {

namespace {

// The wgmma kernels (the two-stage forward's walk at K = 256, the fused kernel at K = 128): in
// sm_90a builds on sm_90 devices, for V a multiple of their V tile (128), unless
// GLA_CUDA_NO_WGMMA=1 asks for the mma.sync kernels (the sm_80 path, tested on Hopper too).
static_assert(chunk_fwd_cfg::kWalkSm90BV == chunk_fwd_cfg::kFusedSm90BV, "one V tile for both wgmma kernels");
bool hopper_wgmma(const FwdParams& p) {
#if defined(GLA_SM90A)
  if (p.V % chunk_fwd_cfg::kWalkSm90BV != 0) return false;
  const char* off = std::getenv("GLA_CUDA_NO_WGMMA");
  if (off != nullptr && off[0] == '1') return false;
  int dev = 0, major = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major == 9;
#else
  (void)p;
  return false;
#endif
}

// Which forward runs at K = 128 on Hopper (sm_90a builds, V a multiple of 128): inference runs
// the warp-specialised fused kernel (chunk_fwd_fused_sm90.cu); training, which keeps the
// backward's intermediates (save_*), runs the two stages (prep, then the wgmma walk), which
// write them from kernels that do nothing else (docs/kernels/chunk_fwd.md; the fused kernel's kSave
// form and the mma.sync kernel are slower there). GLA_CUDA_K128_FORWARD=fused or two_stage runs one
// of them for both (comparisons, tests); elsewhere K = 128 runs the mma.sync kernel.
bool k128_two_stage(const FwdParams& p) {
  if (p.K != 128 || !hopper_wgmma(p)) return false;
  const char* force = std::getenv("GLA_CUDA_K128_FORWARD");
  if (force != nullptr && std::strcmp(force, "two_stage") == 0) return true;
  if (force != nullptr && std::strcmp(force, "fused") == 0) return false;
  return p.save_a != nullptr;
}

bool two_stage(const FwdParams& p) { return chunk_fwd_cfg::two_stage(p.K) || k128_two_stage(p); }

bool hopper_fused(const FwdParams& p) { return p.K == 128 && hopper_wgmma(p) && !k128_two_stage(p); }

template <class T, int K, int BV>
cudaError_t dispatch_g(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  if (p.g_dtype == DType::kFloat32) return run_chunk_fwd<T, float, K, BV>(p, sp, stream);
  return run_chunk_fwd<T, T, K, BV>(p, sp, stream);
}

template <class T>
cudaError_t dispatch_k(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  switch (p.K) {
    case 64: return dispatch_g<T, 64, 64>(p, sp, stream);
    case 128:
      if (hopper_fused(p)) return run_chunk_fused_sm90(p, sp, stream);
      if (chunk_fwd_cfg::block_v(128, p.V) == 128) return dispatch_g<T, 128, 128>(p, sp, stream);
      return dispatch_g<T, 128, 64>(p, sp, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Segment plan: split only when the (sequence, head, V-tile) CTAs fill at most half the GPU
// (one walk per SM) and segments stay at least 256 tokens long; never more CTAs than SMs. A
// pooled call is never split: every segment's walk reads the start slot, which the last one may
// overwrite (gla_params.h, FwdParams).
chunk_fwd_cfg::Split plan_split(const FwdParams& p) {
  if (p.slot_in != nullptr) return {};
  const long long ctas = (long long)p.N * p.H * (p.V / chunk_fwd_cfg::block_v(p.K, p.V));
  return plan_segments(ctas, p.num_sms, 1, 2, p.T);
}

}  // namespace

const char* chunk_fwd_unsupported(const FwdParams& p, int sm_major, int sm_minor) {
  (void)sm_minor;
  if (sm_major < 8) return "chunk_fwd needs sm_80 or newer";
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16)
    return "chunk_fwd needs bfloat16 or float16 q/k/v";
  if (p.g_dtype != DType::kFloat32 && p.g_dtype != p.dtype)
    return "chunk_fwd needs g in float32 or in the dtype of q/k/v";
  if (p.K != 64 && p.K != 128 && p.K != 256) return "chunk_fwd needs K in {64, 128, 256}";
  if (p.V != 64 && p.V != 128 && p.V != 256 && p.V != 512)
    return "chunk_fwd needs V in {64, 128, 256, 512}";
  if (p.H <= 0 || p.N < 0 || p.T < 0) return "chunk_fwd: bad sizes";
  if (p.cu_seqlens != nullptr && p.B != 1) return "chunk_fwd: cu_seqlens needs B == 1";
  if (p.cu_seqlens == nullptr && p.N != p.B) return "chunk_fwd: N must equal B without cu_seqlens";
  if (int64_t(p.N) * p.H > 0x7fffffffLL) return "chunk_fwd: too many (sequence, head) pairs";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.g) || !aligned16(p.o))
    return "chunk_fwd needs 16-byte aligned q, k, v, g, o";
  if ((p.h0 != nullptr && !aligned16(p.h0)) || (p.ht != nullptr && !aligned16(p.ht)))
    return "chunk_fwd needs 16-byte aligned states";
  if (p.slot_in != nullptr && (p.h0 == nullptr || p.h0 != p.ht || p.slot_out == nullptr || p.P < 0))
    return "chunk_fwd: a pooled call reads and writes one pool";
  if (p.ckpt_slots != nullptr && (p.slot_in == nullptr || p.ckpt_every <= 0 ||
                                  p.ckpt_every % chunk_fwd_cfg::kChunk != 0 || p.ckpt_count < 0))
    return "chunk_fwd: checkpoints need a pool and a positive multiple of the chunk";
  const int bv = chunk_fwd_cfg::block_v(p.K, p.V);  // the larger tile
  const int smem = two_stage(p)
      ? std::max({chunk_fwd_cfg::prep_smem_bytes(p.K), chunk_fwd_cfg::walk_smem_bytes(p.K, bv),
                  hopper_wgmma(p) ? chunk_fwd_cfg::walk_sm90_smem_bytes(p.K, chunk_fwd_cfg::kWalkSm90BV) : 0})
      : std::max(chunk_fwd_cfg::smem_bytes(p.K, bv),
                 hopper_fused(p) ? chunk_fwd_cfg::fused_sm90_smem_bytes(p.K, chunk_fwd_cfg::kFusedSm90BV) : 0);
  int dev = 0, max_smem = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "chunk_fwd: cannot query the device";
  if (smem > max_smem) return "chunk_fwd needs more shared memory per block than this GPU has";
  return nullptr;
}

namespace {

// Where the workspace's pieces go: the segment states of a split and, for the two-stage
// forward when the caller keeps none of them, its per-chunk intermediates.
struct WorkspacePlan {
  chunk_fwd_cfg::Split sp;
  bool own = false;  // the two-stage intermediates live in the workspace
  size_t bytes = 0, at_state = 0, at_decay = 0, at_a = 0, at_qx = 0, at_kd = 0, at_dec = 0;
};

WorkspacePlan plan_workspace(const FwdParams& p) {
  WorkspacePlan w;
  w.sp = plan_split(p);
  auto take = [&](size_t n) {
    const size_t at = (w.bytes + 255) / 256 * 256;
    w.bytes = at + n;
    return at;
  };
  const size_t seg_states = w.sp.seg_len > 0 ? size_t(p.N) * p.H * w.sp.nseg * p.K : 0;
  w.at_state = take(seg_states * p.V * sizeof(float));
  w.at_decay = take(seg_states * sizeof(float));
  w.own = two_stage(p) && p.save_a == nullptr;
  if (w.own) {
    const size_t rows = size_t(p.B) * p.T * p.H;  // 16-bit elements below
    w.at_a = take(rows * chunk_fwd_cfg::kChunk * 2);
    w.at_qx = take(rows * p.K * 2);
    w.at_kd = take(rows * p.K * 2);
    w.at_dec = take(size_t(chunk_fwd_cfg::num_slots(p)) * p.H * 3 * p.K * sizeof(float));
  }
  return w;
}

}  // namespace

size_t chunk_fwd_workspace_bytes(const FwdParams& p) { return plan_workspace(p).bytes; }

cudaError_t chunk_fwd(const FwdParams& p_in, void* workspace, cudaStream_t stream) {
  if (p_in.dtype != DType::kBFloat16 && p_in.dtype != DType::kFloat16) return cudaErrorInvalidValue;
  FwdParams p = p_in;
  const WorkspacePlan w = plan_workspace(p);
  if (w.bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  chunk_fwd_cfg::Split sp = w.sp;
  if (sp.seg_len > 0) {
    sp.ws_state = reinterpret_cast<float*>(ws + w.at_state);
    sp.ws_decay = reinterpret_cast<float*>(ws + w.at_decay);
  }
  if (w.own) {
    p.save_a = ws + w.at_a;
    p.save_qx = ws + w.at_qx;
    p.save_kd = ws + w.at_kd;
    p.save_decay = reinterpret_cast<float*>(ws + w.at_dec);
  }
  cudaError_t err = sp.seg_len > 0 ? run_segment_states(p, sp, stream) : cudaSuccess;
  if (two_stage(p)) {
    if (err == cudaSuccess) err = run_chunk_prep(p, stream);
    if (err == cudaSuccess) err = hopper_wgmma(p) ? run_chunk_walk_sm90(p, sp, stream) : run_chunk_walk(p, sp, stream);
  } else if (err == cudaSuccess) {
    err = p.dtype == DType::kBFloat16 ? dispatch_k<cute::bfloat16_t>(p, sp, stream)
                                      : dispatch_k<cute::half_t>(p, sp, stream);
  }
  return err;
}

}  // namespace gla
