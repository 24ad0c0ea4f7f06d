// A K x V state tile held in registers as a float32 MMA accumulator fragment rS, with tUc the
// matching (row, column) coordinates, the pairs (i, i + 1) adjacent columns; with kT (the Hopper
// walks, which keep S^T) rS holds the V x K tile, tUc gives (column, row) and the pairs are
// adjacent rows. Its stores into [K, V] row-major states in global memory, for the forward's
// walks and the backward's state-gradient walk.
#pragma once

#include <cute/tensor.hpp>

#include "device_common.cuh"
#include "intermediates.h"  // KeptState: the element type of kept states and dh

namespace gla {

// Offset of element i of rS in a [K, V] row-major state (row stride V).
template <bool kT, class Coord>
__device__ __forceinline__ int64_t state_offset(const Coord& tUc, int i, int V) {
  const int kk = cute::get<kT ? 1 : 0>(tUc(i)), vv = cute::get<kT ? 0 : 1>(tUc(i));
  return int64_t(kk) * V + vv;
}

// The state into dst ([K, V] row-major, this V tile's columns), float32 or 16-bit (pairs packed
// where they are adjacent columns).
template <class T, bool kT = false, class D, class Frag, class Coord>
__device__ __forceinline__ void store_state(D* dst, int V, const Frag& rS, const Coord& tUc) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < size(rS); i += kT ? 1 : 2) {
    D* ptr = dst + state_offset<kT>(tUc, i, V);
    if constexpr (kT) *ptr = D(rS(i));
    else if constexpr (cute::is_same_v<D, float>) *reinterpret_cast<float2*>(ptr) = make_float2(rS(i), rS(i + 1));
    else *reinterpret_cast<uint32_t*>(ptr) = pack2<T>(rS(i), rS(i + 1));
  }
}

}  // namespace gla
