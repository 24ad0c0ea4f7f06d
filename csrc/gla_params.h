// Kernel-side description of one GLA call. No torch headers here: kernel files
// include only this, CUDA and CUTLASS/CuTe, so they compile quickly and in parallel.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace gla {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kInt8 = 3 };  // kInt8: flags only

// The kernels' 16-byte vector loads and stores need 16-byte aligned tensors (host-side checks).
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Segment splitting, for when the walks down the sequences (one CTA per sequence, head and
// tile) are too few for the GPU: each sequence is cut into segments of seg_len tokens (a
// multiple of the 64-token chunk). A first pass walks every segment from zero and stores what it
// adds to the carried state (forward: its end state; backward: the state gradient at its start)
// with its total decay exp(sum g) per channel; the second walks every segment from the carried
// value composed with those of the segments it depends on.
struct SegmentSplit {
  int seg_len = 0;            // 0: no splitting (one segment per sequence)
  int nseg = 1;               // segments per sequence (of the longest possible sequence, T)
  float* ws_state = nullptr;  // [N * H, nseg, K, V] float32
  float* ws_decay = nullptr;  // [N * H, nseg, K] float32
};

// The split for `walks` CTAs (of `per_sm` to an SM) and sequences of up to T tokens: enough
// segments to fill the GPU, each at least 256 tokens long, and none unless there are at
// least min_nseg of them.
inline SegmentSplit plan_segments(long long walks, int num_sms, int per_sm, int min_nseg, int T) {
  SegmentSplit sp;
  if (walks <= 0 || num_sms <= 0) return sp;
  long long nseg = (long long)num_sms * per_sm / walks;
  if (nseg > T / 256) nseg = T / 256;
  if (nseg < min_nseg) return sp;
  const long long per = (T + nseg - 1) / nseg;
  const long long seg_len = (per + 63) / 64 * 64;
  nseg = (T + seg_len - 1) / seg_len;
  if (nseg < min_nseg) return sp;
  sp.seg_len = int(seg_len);
  sp.nseg = int(nseg);
  return sp;
}

// What every kernel family reads. All tensors are contiguous. q, k, g: [B, T, H, K];
// v (and o, do): [B, T, H, V]; states: float32 [N, H, K, V]. With cu_seqlens (int32, [N + 1], on
// the device) B == 1 and sequence n spans tokens [cu_seqlens[n], cu_seqlens[n + 1]).
struct GlaParams {
  const void* q;
  const void* k;
  const void* v;
  const void* g;
  const int32_t* cu_seqlens;  // or nullptr
  int B, T, H, K, V, N;
  float scale;
  DType dtype;                // of q, k, v (and o, do, dv)
  DType g_dtype;              // kFloat32 or dtype
};

// The chunked forward (csrc/chunk_fwd/).
struct FwdParams : GlaParams {
  void* o;
  const float* h0;            // initial state or nullptr
  float* ht;                  // final state or nullptr
  int num_sms;                // of the current device
  // Serving prefill over a state pool (chunk_gla_pooled): h0 and ht are then both the pool
  // [P, H, K, V] ([P, H, V, K] with state_v_first), and the slots are int32 or int64 (*_int64).
  // Sequence n starts from slot slot_in[n] (from zeros where has_h0[n] is false) and stores its
  // final state to slot slot_out[n], and the state after every ckpt_every tokens (a multiple of
  // the chunk) to ckpt_slots[n, j] (j < ckpt_count). A slot outside [0, P) is not read or
  // written; slot_in[n] outside it marks padding: the sequence's output is zeros and no slot is
  // touched. Pooled calls walk every sequence in one CTA per (head, V tile), no segment split,
  // so that a slot is read before it is written by the same threads (in-place updates).
  const void* slot_in;        // [N] or nullptr (not pooled)
  const void* slot_out;       // [N]
  const bool* has_h0;         // [N] or nullptr (every sequence has its initial state)
  const void* ckpt_slots;     // [N, ckpt_count] or nullptr
  int P, ckpt_every, ckpt_count;
  bool slot_in_int64, slot_out_int64, ckpt_int64;
  bool state_v_first;         // h0, ht (and the pool) stored [.., V, K]
  // Training: the intermediates the backward reads, in the layout of csrc/intermediates.h
  // (nullptr save_a: nothing is kept). Chunk c of sequence n is slot chunk_off[n] + c.
  const int64_t* chunk_off;   // [N + 1]
  void* save_a;               // A
  int8_t* save_flags;         // flags
  void* save_qx;              // qx
  void* save_kd;              // kd
  float* save_decay;          // decays
  void* save_h;               // states
};

// The recurrent kernels (csrc/recurrent/): one step per token, the state tile in registers.
// With `pool` set, batch row b reads and updates, in place, the state pool[index[b]] of pool
// [P, H, K, V] (h0 and ht unused), and an index outside [0, P) skips the row (its outputs are
// zeros). With state_v_first every state is stored [.., V, K] instead.
struct RecurrentParams : GlaParams {
  void* o;                    // forward output, or nullptr in the backward
  const float* h0;            // initial state or nullptr
  float* ht;                  // final state or nullptr
  float* pool;                // pooled decode: states updated in place, or nullptr
  const void* index;          // [B] int32 or int64 (index_int64), with pool
  bool index_int64;
  bool state_v_first;
  int P;                      // pool slots
  // backward: do in v's dtype; dq, dk, dg are float32 partial sums per V tile
  // ([ceil(V / 64), B * T * H, K], summed by the caller), dv in v's dtype.
  const void* dout;
  const float* dht;           // or nullptr
  float* dq_part;
  float* dk_part;
  float* dg_part;
  void* dv;
  float* dh0;                 // or nullptr
};

// The chunked backward (csrc/chunk_bwd/), from a training forward's intermediates (FwdParams'
// save_*, layout in csrc/intermediates.h: slot chunk_off[n] + c is chunk c of sequence n,
// chunk_seq[slot] its sequence, N or more for the surplus slots of a varlen batch).
// dq, dk, dg are written in their own dtypes (q's, q's, g's), dv in v's, dh0 float32 [N, H, K, V].
struct BwdParams : GlaParams {
  const void* dout;           // do, like v
  const float* dht;           // gradient on the final state or nullptr
  void* dq;
  void* dk;
  void* dg;
  void* dv;
  float* dh0;                 // or nullptr
  int num_sms;
  const int64_t* chunk_off;   // [N + 1]
  const int64_t* chunk_seq;   // [num_slots]
  int64_t num_slots;
  const void* saved_a;        // A
  const void* saved_qx;       // qx
  const void* saved_kd;       // kd
  const float* saved_decay;   // decays
  const void* saved_h;        // states
  void* dh;                   // [slots, H, K, V] in the states' dtype, workspace: the gradient
                              // with respect to every chunk's final state (the dh walk's output)
};

}  // namespace gla
