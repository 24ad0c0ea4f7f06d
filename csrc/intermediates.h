// The training contract: what the training forward keeps for the chunked backward, written once
// here for the kernels (FwdParams::save_*, BwdParams::saved_*) and the bindings (allocation and
// checks). Torch-free. The Triton backend keeps the same tensors in the same layout, so either
// forward feeds either backward.
//
// Notation: C = 64 tokens per chunk; per (sequence, head) and chunk, b is the inclusive cumulative
// sum of g inside the chunk (b_t, natural-log units), b_0 its first row and Gamma its last (the
// chunk's last token; the last chunk of a sequence may be partial).
//
// Chunk slots: chunk c of sequence n is slot chunk_off[n] + c, chunk_off (int64, [N + 1]) the
// cumulative chunk counts ceil(len_n / C); chunk_seq (int64, [NC]) maps a slot to its sequence.
// NC, the number of slots, depends on shapes alone (num_slots): B * ceil(T / C) without
// cu_seqlens, floor(T / C) + N with them (B == 1; an upper bound, the surplus slots at the end
// have chunk_seq >= N and are never read).
//
// The kept tensors, in this order (Kept):
//   A       [B * T, H, C]  input dtype  row t (token) of the chunk that starts at token t0:
//                                       A[t, h, j] = scale * sum_k q[t, h, k] k[t0 + j, h, k]
//                                       exp(b_t - b_{t0+j}) for t0 + j <= t, 0 above the diagonal
//   flags   [NC, H]        int8         1 where some channel's |b_t - b_32| > 40 (the chunk's
//                                       scores took the exact path), else 0
//   qx      [B, T, H, K]   input dtype  scale * q * exp(b - b_0)
//   kd      [B, T, H, K]   input dtype  k * exp(Gamma - b)
//   decays  [NC, H, 3, K]  float32      exp(Gamma), exp(Gamma - b_0), exp(b_0) per channel
//   states  [NC, H, K, V]  kept state   the state entering the chunk (before its first token)
// "input dtype" is q's. The kept-state dtype (kept_state_dtype): bfloat16 for bfloat16 inputs,
// float32 for float16 (a state can exceed its range, and the backward's dh, stored alike, falls
// below it with strong gates) and for float32. The backward's workspace dh [NC, H, K, V] (the
// gradient with respect to every chunk's final state) is stored in the same dtype; where states
// and dh are MMA operands they are rounded to the input dtype.
#pragma once

#include <cstdint>
#include <type_traits>

#include "gla_params.h"

#if defined(__CUDACC__)
#include <cute/numeric/numeric_types.hpp>
#endif

namespace gla {
namespace intermediates {

constexpr int kChunk = 64;  // C: tokens per chunk

enum Kept : int { kA = 0, kFlags, kQx, kKd, kDecays, kStates, kNumKept };
constexpr const char* kNames[kNumKept] = {"A", "flags", "qx", "kd", "decays", "states"};

constexpr DType kept_state_dtype(DType input) {
  return input == DType::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
}

constexpr DType dtype(Kept which, DType input) {
  switch (which) {
    case kFlags: return DType::kInt8;
    case kDecays: return DType::kFloat32;
    case kStates: return kept_state_dtype(input);
    default: return input;  // A, qx, kd
  }
}

inline int64_t num_slots(int64_t B, int64_t T, int64_t N, bool varlen) {
  return varlen ? T / kChunk + N : B * ((T + kChunk - 1) / kChunk);
}

// The shape of a kept tensor (rank dims of size[]) for inputs q [B, T, H, K], v [.., V] and NC slots.
struct Shape {
  int rank;
  int64_t size[4];
};
constexpr Shape shape(Kept which, int64_t B, int64_t T, int64_t H, int64_t K, int64_t V, int64_t NC) {
  switch (which) {
    case kA: return {3, {B * T, H, kChunk, 0}};
    case kFlags: return {2, {NC, H, 0, 0}};
    case kDecays: return {4, {NC, H, 3, K}};
    case kStates: return {4, {NC, H, K, V}};
    default: return {4, {B, T, H, K}};  // qx, kd: like q
  }
}

}  // namespace intermediates

#if defined(__CUDACC__)
// The kernels' element type of the kept states and of dh for inputs of element type T (cute
// types), from kept_state_dtype.
template <class T> struct DTypeOf;
template <> struct DTypeOf<cute::bfloat16_t> { static constexpr DType value = DType::kBFloat16; };
template <> struct DTypeOf<cute::half_t> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <class T> struct KeptState {
  using type = std::conditional_t<intermediates::kept_state_dtype(DTypeOf<T>::value) == DTypeOf<T>::value, T, float>;
};
#endif

}  // namespace gla
