// Tile configuration of the fused chunked backward, shared by the kernels, the launch
// template and the host-side dispatch. Plain C++ (no CuTe) so the dispatch file compiles fast.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "gla_params.h"

namespace gla {
namespace chunk_bwd_cfg {

constexpr int kChunk = 64;     // tokens per chunk (C)
constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kBV = 64;        // V-tile width of both kernels (the K x BV float32 state in registers)

// Workspace slot of chunk c of sequence n (first token bos): n + bos / C + c. Slots of different
// (sequence, chunk) pairs never collide and stay below n_slots(N, total tokens), so the
// workspace is sized from shapes alone (no host synchronisation for cu_seqlens).
__host__ __device__ constexpr int64_t slot(int64_t n, int64_t bos, int c) { return n + bos / kChunk + c; }
constexpr int64_t n_slots(int64_t N, int64_t total_tokens) { return N + total_tokens / kChunk; }

// Shared memory of the state walk (chunk_bwd_states.cuh): the state entering every chunk.
struct StatesSmem {
  int K;
  constexpr int ldq() const { return K + 8; }        // k: [C][K+8] (input dtype)
  constexpr int ldb() const { return K + 8; }        // b (float) [C][K+8]; raw g staged here
  constexpr int ldv() const { return kBV + 8; }      // v: [C][BV+8]
  constexpr int ldkt() const { return kChunk + 8; }  // (k exp(G - b))^T: [K][C+8]
  constexpr int tpc() const { return kThreads / K; } // threads per channel in the cumsum
  constexpr int off_k() const { return 0; }
  constexpr int off_b() const { return off_k() + kChunk * ldq() * 2; }
  constexpr int off_v() const { return off_b() + kChunk * ldb() * 4; }
  constexpr int off_kt() const { return off_v() + kChunk * ldv() * 2; }
  constexpr int off_gam() const { return off_kt() + K * ldkt() * 2; }
  constexpr int off_tot() const { return off_gam() + K * 4; }
  constexpr int bytes() const { return off_tot() + tpc() * K * 4; }
};

// Shared memory of the reverse kernel (chunk_bwd_kernel.cuh). Rows are padded by 16 bytes
// (32 for float rows) so ldmatrix and the fragment accesses are free of bank conflicts.
struct Smem {
  int K;
  static constexpr int C = kChunk, BV = kBV;
  constexpr int ldq() const { return K + 8; }     // q, k, kg = k exp(G - b): [C][K+8]
  constexpr int ldb() const { return K + 8; }     // b = log2(e) cumsum(g): [C][K+8] float
  constexpr int ldv() const { return BV + 8; }    // v, do: [C][BV+8]
  constexpr int ldh() const { return BV + 8; }    // h, dh (input dtype): [K][BV+8]
  constexpr int lda() const { return C + 8; }     // A, dA (input dtype): [C][C+8]
  constexpr int ldqt() const { return C + 8; }    // (scale q exp(b))^T: [K][C+8]
  constexpr int ldf() const { return 64 + 8; }    // float [C][64+8] buffers, one 64-channel half
  constexpr int tpc() const { return kThreads / K; }
  constexpr int kg_bytes() const { return C * ldq() * 2 > K * ldqt() * 2 ? C * ldq() * 2 : K * ldqt() * 2; }
  constexpr int off_q() const { return 0; }
  constexpr int off_k() const { return off_q() + C * ldq() * 2; }
  constexpr int off_b() const { return off_k() + C * ldq() * 2; }
  constexpr int off_v() const { return off_b() + C * ldb() * 4; }
  constexpr int off_do() const { return off_v() + C * ldv() * 2; }
  constexpr int off_h() const { return off_do() + C * ldv() * 2; }
  constexpr int off_dh() const { return off_h() + K * ldh() * 2; }
  constexpr int off_a() const { return off_dh() + K * ldh() * 2; }
  constexpr int off_da() const { return off_a() + C * lda() * 2; }
  constexpr int off_dad() const { return off_da() + C * lda() * 2; }   // float [4][16][16]
  constexpr int off_kg() const { return off_dad() + 4 * 16 * 16 * 4; } // kg, later qg^T
  constexpr int off_f() const { return off_kg() + kg_bytes(); }        // 3 float [C][ldf]
  constexpr int off_gam() const { return off_f() + 3 * C * ldf() * 4; } // exp(G) [K]
  constexpr int off_dgh() const { return off_gam() + K * 4; }           // [2][K] float
  constexpr int off_tot() const { return off_dgh() + 2 * K * 4; }       // [tpc][K] (cumsum)
  constexpr int off_scan() const { return off_tot() + tpc() * K * 4; }  // [2][4][64] float
  constexpr int bytes() const { return off_scan() + 2 * 4 * 64 * 4; }
};

constexpr int states_smem_bytes(int K) { return StatesSmem{K}.bytes(); }
constexpr int smem_bytes(int K) { return Smem{K}.bytes(); }

}  // namespace chunk_bwd_cfg

// One instantiation per (input dtype, gate dtype, K): the state walk then the reverse kernel.
// Defined in chunk_bwd_launch.cuh, instantiated in chunk_bwd_<dtype>_k<K>.cu.
template <class T, class GT, int K>
cudaError_t run_chunk_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace gla
