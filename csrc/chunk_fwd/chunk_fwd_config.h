// Tile configuration of the fused chunked forward, shared by the kernel, the launch
// template and the host-side dispatch. Plain C++ (no CuTe) so the dispatch file compiles fast.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "gla_params.h"
#include "intermediates.h"

namespace gla {
namespace chunk_fwd_cfg {

constexpr int kChunk = intermediates::kChunk;  // tokens per chunk (C)

// A walk's pool instantiation (FwdParams::slot_in): none; states from and to pool slots; slots
// and checkpoints. Checkpoints store the state inside the chunk loop, which costs the walks
// registers (spills in the Hopper fused kernel), so only calls that ask for them pay for them.
enum PoolWalk : int { kNoPool = 0, kPoolSlots = 1, kPoolCheckpoints = 2 };

// Which instantiation a walk launches: training's (`keeps`: this family's kernel keeps the
// backward's intermediates), a pooled call's, or the plain one. launch(save, pool) gets kSave and
// kPool as std::integral_constant, for its template arguments.
template <class Launch>
cudaError_t launch_walk_for(const FwdParams& p, bool keeps, Launch&& launch) {
  using Save = std::integral_constant<bool, true>;
  using NoSave = std::integral_constant<bool, false>;
  if (keeps) return launch(Save{}, std::integral_constant<int, kNoPool>{});
  if (p.slot_in == nullptr) return launch(NoSave{}, std::integral_constant<int, kNoPool>{});
  if (p.ckpt_slots != nullptr) return launch(NoSave{}, std::integral_constant<int, kPoolCheckpoints>{});
  return launch(NoSave{}, std::integral_constant<int, kPoolSlots>{});
}
constexpr int kThreads = 256;  // 8 warps per CTA

// V-tile width: the K x BV float32 state lives in registers, at most 64 floats per thread.
// K = 128 uses BV = 128 when it can: the intra-chunk scores are then computed once per head.
constexpr int block_v(int K, int V) { return K == 128 && V % 128 == 0 ? 128 : 64; }

// The forward's segment split (gla_params.h): pass 1 (run_segment_states) stores the end state
// of every segment but the last; pass 2 (the walk) starts from h0 composed with those before it.
using Split = SegmentSplit;

// Shared-memory layout (bytes). Rows are padded by 16 bytes so ldmatrix and the
// per-thread fragment loads are free of bank conflicts.
struct Smem {
  int K, BV;
  constexpr int ldq() const { return K + 8; }       // q, k: [C][K+8] (input dtype)
  constexpr int ldb() const { return K + 8; }       // b = log2(e) * cumsum(g): [C][K+8] float
  constexpr int ldv() const { return BV + 8; }      // v: [C][BV+8]
  constexpr int ldkt() const { return kChunk + 8; } // (k * exp(G - b))^T: [K][C+8]
  constexpr int lda() const { return kChunk + 8; }  // intra-chunk scores: [C][C+8]
  constexpr int lds() const { return BV + 8; }      // state (input dtype): [K][BV+8]
  constexpr int tpc() const { return kThreads / K; } // threads per channel in the cumsum
  constexpr int off_q() const { return 0; }
  constexpr int off_k() const { return off_q() + kChunk * ldq() * 2; }
  // v is double-buffered: the next chunk's v loads during the whole current chunk
  constexpr int off_v() const { return off_k() + kChunk * ldq() * 2; }
  constexpr int off_b() const { return off_v() + 2 * kChunk * ldv() * 2; }  // raw g is staged here too
  constexpr int off_kt() const { return off_b() + kChunk * ldb() * 4; }
  constexpr int off_a() const { return off_kt() + K * ldkt() * 2; }
  constexpr int off_st() const { return off_a() + kChunk * lda() * 2; }
  constexpr int off_gam() const { return off_st() + K * lds() * 2; }
  constexpr int off_tot() const { return off_gam() + K * 4; }
  // exp(g) per step (float, [C][K+8]) for the diagonal sub-blocks; q~ of the one-reference scores
  constexpr int off_e() const { return off_tot() + tpc() * K * 4; }
  constexpr int bytes() const { return off_e() + kChunk * ldb() * 4; }
};

constexpr int smem_bytes(int K, int BV) { return Smem{K, BV}.bytes(); }

// K = 256 runs the two-stage forward: the fused kernel would redo the scores and the gated
// operands for each of the V / 64 tiles of a head (and spill). Stage 1 (prep) computes them
// once per (chunk, head), in parallel over chunks; stage 2 (walk) streams them down the
// sequence with the state in registers and does little but MMAs. On Hopper the training forward
// at K = 128 runs the two stages too (chunk_fwd_dispatch.cu, k128_two_stage).
constexpr bool two_stage(int K) { return K == 256; }
// q, k [C][K+8] (16-bit), b [C][K+8] float, A [C][C+8], the cumsum's partial sums (kThreads floats)
constexpr int prep_smem_bytes(int K) { return kChunk * (K + 8) * (2 + 2 + 4) + kChunk * (kChunk + 8) * 2 + kThreads * 4; }
constexpr int walk_smem_bytes(int K, int BV) {
  // two stages of {qx, kd [C][K+8], v [C][BV+8], A [C][C+8] (16-bit), exp(G), exp(b_0) [K]}; S [K][BV+8]
  return 2 * (kChunk * (2 * (K + 8) + (BV + 8) + (kChunk + 8)) * 2 + 2 * K * 4) + K * (BV + 8) * 2;
}

// The Hopper walk (chunk_fwd_twostage_walk_sm90.cu) takes V tiles of kWalkSm90BV columns (V = 64 runs
// the mma.sync walk). Per stage qx, kd [C][K], A [C][C], v [C][BV] (16-bit, unpadded: wgmma's
// swizzled layouts) and the decays [3][K] float, rounded to 1024 bytes; then two output tiles
// [C][BV+8] (16-bit), four mbarriers (64 bytes kept) and 1024 bytes to align the base.
constexpr int kWalkSm90BV = 128;
constexpr int walk_sm90_smem_bytes(int K, int BV) {
  return 2 * ((kChunk * (2 * K + BV + kChunk) * 2 + 3 * K * 4 + 1023) / 1024 * 1024) + 2 * kChunk * (BV + 8) * 2 + 64 +
         1024;
}

// The Hopper fused kernel (chunk_fwd_fused_sm90.cu; K = 128, V a multiple of kFusedSm90BV):
// two producer warpgroups and one consumer warpgroup, which takes registers from the producers
// (setmaxnreg: 256 * producer + 128 * consumer registers within the 64,512 a CTA of 384 threads
// starts with, or the consumer's request never completes).
// smem: two stages of {qx or q~, kd or k~ [C][K], A [C][C], v [C][BV] (16-bit, wgmma's swizzled
// layouts), the chunk's factors [3][K] float and a flag} rounded to 1024 bytes, the output tile
// [C][BV+8] (16-bit), the producers' prep tiles, four mbarriers (64 bytes kept) and 1024 bytes to
// align the base.
constexpr int kFusedSm90BV = 128;
constexpr int kFusedSm90Threads = 3 * 128;
constexpr int kFusedSm90ProducerRegs = 128, kFusedSm90ConsumerRegs = 248;
static_assert(256 * kFusedSm90ProducerRegs + 128 * kFusedSm90ConsumerRegs <= 64512, "setmaxnreg budget");
constexpr int fused_sm90_smem_bytes(int K, int BV) {
  return 2 * ((kChunk * (2 * K + kChunk + BV) * 2 + 3 * K * 4 + 16 + 1023) / 1024 * 1024) + kChunk * (BV + 8) * 2 +
         prep_smem_bytes(K) + 64 + 1024;
}

// Per-chunk slots of the two-stage intermediates: chunk c of sequence n is slot
// slot_base(n) + c. Training passes chunk_off (intermediates.h); otherwise a batch
// has ceil(T / C) slots per row and varlen sequence n starts at slot cu[n] / C + n (increasing,
// and a sequence of len tokens from bos spans at most floor((bos + len) / C) - floor(bos / C) + 1
// chunks, so slots never collide and stay below num_slots).
inline int64_t num_slots(const FwdParams& p) {
  return intermediates::num_slots(p.B, p.T, p.N, p.cu_seqlens != nullptr);
}
#ifdef __CUDACC__
__device__ __forceinline__ int64_t slot_base(const FwdParams& p, int n) {
  if (p.chunk_off != nullptr) return p.chunk_off[n];
  if (p.cu_seqlens != nullptr) return p.cu_seqlens[n] / kChunk + n;
  return int64_t(n) * ((p.T + kChunk - 1) / kChunk);
}
#endif

}  // namespace chunk_fwd_cfg

// The fused kernel (pass 2 of a split): one instantiation per (input dtype, gate dtype, K, BV).
// Defined in chunk_fwd_fused_sm80_launch.cuh, instantiated in chunk_fwd_fused_sm80_<dtype>_k<K>.cu. T/GT are
// cute::bfloat16_t, cute::half_t or float.
template <class T, class GT, int K, int BV>
cudaError_t run_chunk_fwd(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream);

// The two-stage forward (two_stage(K)). Stage 1 writes, per chunk slot and head, the scores
// (save_a), the exact flags (save_flags, where set), the gated operands save_qx, save_kd and the
// decays (save_decay); stage 2 reads them and writes o, ht and, with save_h set, the state
// entering every chunk. chunk_fwd_twostage_prep.cu, chunk_fwd_twostage_walk_sm80.cu.
cudaError_t run_chunk_prep(const FwdParams& p, cudaStream_t stream);
cudaError_t run_chunk_walk(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream);
// The walk with wgmma (sm_90a builds, sm_90 devices): chunk_fwd_twostage_walk_sm90.cu.
cudaError_t run_chunk_walk_sm90(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream);

// The fused kernel on Hopper (sm_90a builds, sm_90 devices): chunk_fwd_fused_sm90.cu.
cudaError_t run_chunk_fused_sm90(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream);

// Pass 1 of a split (split.seg_len > 0): the segments' end states and decays into the workspace.
// chunk_fwd_segment_pass.cu.
cudaError_t run_segment_states(const FwdParams& p, const chunk_fwd_cfg::Split& split, cudaStream_t stream);

}  // namespace gla
