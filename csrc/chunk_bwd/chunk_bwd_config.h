// Tile configuration of the chunked backward, shared by the kernels, the launch templates and
// the host-side dispatch. Plain C++ (no CuTe) so the dispatch file compiles fast.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "gla_params.h"
#include "intermediates.h"

namespace gla {
namespace chunk_bwd_cfg {

constexpr int kChunk = intermediates::kChunk;  // tokens per chunk (C)
constexpr int kThreads = 256;  // dq/dk/dg: 8 warps per (slot, head, 64 channels of K)

// The kernels: the dh walk, dv, and dq/dk/dg (chunk_bwd_dh_sm80.cuh, chunk_bwd_dv_sm80.cuh,
// chunk_bwd_dqkg_sm80.cuh). Rows of 64 16-bit elements are padded to 72 (ldmatrix and fragment
// accesses free of bank conflicts).
constexpr int kWalkThreads = 256;  // the dh walk: 8 warps per (sequence, head, 64 x 64 tile)
constexpr int kDvThreads = 128;    // dv: 4 warps per (slot, head, 64 columns of V)

struct WalkSmem {
  constexpr int ld() const { return 64 + 8; }
  constexpr int off_do() const { return kChunk * ld() * 2; }        // within a stage: qx, do
  constexpr int off_e() const { return off_do() + kChunk * ld() * 2; }  // [2][64] float decays
  constexpr int stage_bytes() const { return off_e() + 2 * 64 * 4; }
  constexpr int off_out() const { return 2 * stage_bytes(); }        // dS tile [64][ld]
  constexpr int bytes() const { return off_out() + 64 * ld() * 2; }
};

struct DvSmem {
  int K;
  constexpr int ldk() const { return K + 8; }  // kd [C][K + 8]
  constexpr int ld() const { return 64 + 8; }   // dh [K][72], A, do (then dv) [C][72]
  constexpr int off_kd() const { return 0; }
  constexpr int off_dh() const { return off_kd() + kChunk * ldk() * 2; }
  constexpr int off_a() const { return off_dh() + K * ld() * 2; }
  constexpr int off_do() const { return off_a() + kChunk * ld() * 2; }
  constexpr int bytes() const { return off_do() + kChunk * ld() * 2; }
};

// dq/dk/dg: two CTAs per SM (<= 113 KB each).
struct DqkgSmem {
  constexpr int ld() const { return 64 + 8; }   // q, k [C][72]; stage do, v [C][72], h, dh [64][72]; dA
  constexpr int ldb() const { return 64 + 8; }  // b (float) [C][72]
  constexpr int ldf() const { return 64 + 8; }  // float [C][72] buffers: two over the stage, one more
  constexpr int off_q() const { return 0; }
  constexpr int off_k() const { return off_q() + kChunk * ld() * 2; }
  constexpr int off_b() const { return off_k() + kChunk * ld() * 2; }
  constexpr int off_stage() const { return off_b() + kChunk * ldb() * 4; }
  constexpr int off_f2() const { return off_stage() + 4 * kChunk * ld() * 2; }
  constexpr int off_da() const { return off_f2() + kChunk * ldf() * 4; }
  constexpr int off_dad() const { return off_da() + kChunk * ld() * 2; }  // float [4][16][16]
  constexpr int off_gam() const { return off_dad() + 4 * 16 * 16 * 4; }   // exp(G) [64]
  constexpr int off_dgh() const { return off_gam() + 64 * 4; }            // [64] float
  constexpr int off_tot() const { return off_dgh() + 64 * 4; }            // [4][64] (cumsum)
  constexpr int off_scan() const { return off_tot() + 4 * 64 * 4; }       // [2][4][64] float
  constexpr int bytes() const { return off_scan() + 2 * 4 * 64 * 4; }
};
static_assert(2 * kChunk * DqkgSmem{}.ldf() * 4 <= 4 * kChunk * DqkgSmem{}.ld() * 2,
              "two float buffers must fit over the stage");
static_assert(DqkgSmem{}.bytes() <= 113 * 1024, "dq/dk/dg: two CTAs per SM");

}  // namespace chunk_bwd_cfg

// The dh walk's segment split: only where the walks would leave most of the GPU idle (enough
// segments for two walks per SM, and at least three: the first pass costs about as much as the
// second).
inline SegmentSplit plan_dh_split(const BwdParams& p) {
  return plan_segments((long long)p.N * p.H * (p.K / 64) * (p.V / 64), p.num_sms, 2, 3, p.T);
}

// The three launches: the dh walk (two with a split), dv (K in {64, 128, 256}) and dq/dk/dg.
// Defined in chunk_bwd_sm80_launch.cuh, instantiated in chunk_bwd_dh_dv_sm80_{bf16,fp16}.cu and chunk_bwd_dqkg_sm80_{bf16,fp16}.cu.
template <class T>
cudaError_t run_chunk_bwd_dh(const BwdParams& p, const SegmentSplit& sp, cudaStream_t stream);
template <class T, int K>
cudaError_t run_chunk_bwd_dv(const BwdParams& p, cudaStream_t stream);
template <class T, class GT>
cudaError_t run_chunk_bwd_dqkg(const BwdParams& p, cudaStream_t stream);

}  // namespace gla
