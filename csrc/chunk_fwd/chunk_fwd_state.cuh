// The register-resident state of the chunked forward's sequence walks (the fused kernel and the
// two-stage walk): its initial value and its final store. rS is a float32 MMA accumulator
// fragment of the K x BV tile, tUc the matching (row, column) coordinates; the pairs (i, i + 1)
// are adjacent columns.
#pragma once

#include <cute/tensor.hpp>

#include "chunk_fwd_config.h"
#include "device_common.cuh"
#include "gla_params.h"

namespace gla {

// Storage of the kept states (training): bf16 for bf16 inputs, float32 for float16 (whose
// range a state can exceed), as the Triton backward that reads them keeps them.
template <class T> struct KeptState { using type = T; };
template <> struct KeptState<cute::half_t> { using type = float; };

// h0 (or zero), then, in pass 2 of a split, the end states of the segments before `seg`
// composed in order: S = exp(sum g over segment j) S + S_j.
template <int K, int BV, class Frag, class Coord>
__device__ __forceinline__ void load_initial_state(const FwdParams& p, const chunk_fwd_cfg::Split& sp, int64_t nh,
                                                   int vt, int seg, Frag& rS, const Coord& tUc) {
  using namespace cute;
  if (p.h0 != nullptr) {
    const float* h0 = p.h0 + nh * K * p.V + int64_t(vt) * BV;
    CUTE_UNROLL
    for (int i = 0; i < size(rS); i += 2) {
      const int kk = get<0>(tUc(i)), vv = get<1>(tUc(i));
      const float2 x = *reinterpret_cast<const float2*>(h0 + int64_t(kk) * p.V + vv);
      rS(i) = x.x;
      rS(i + 1) = x.y;
    }
  } else {
    clear(rS);
  }
  for (int j = 0; j < seg; ++j) {
    const float* Sj = sp.ws_state + (nh * sp.nseg + j) * K * p.V + int64_t(vt) * BV;
    const float* Dj = sp.ws_decay + (nh * sp.nseg + j) * K;
    CUTE_UNROLL
    for (int i = 0; i < size(rS); i += 2) {
      const int kk = get<0>(tUc(i)), vv = get<1>(tUc(i));
      const float dk = Dj[kk];
      const float2 x = *reinterpret_cast<const float2*>(Sj + int64_t(kk) * p.V + vv);
      rS(i) = dk * rS(i) + x.x;
      rS(i + 1) = dk * rS(i + 1) + x.y;
    }
  }
}

// The state into dst ([K, V] row-major, this V tile's columns), float32 or 16-bit (pairs packed).
template <class T, class D, class Frag, class Coord>
__device__ __forceinline__ void store_state(D* dst, int V, const Frag& rS, const Coord& tUc) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < size(rS); i += 2) {
    D* ptr = dst + int64_t(get<0>(tUc(i))) * V + get<1>(tUc(i));
    if constexpr (cute::is_same_v<D, float>) *reinterpret_cast<float2*>(ptr) = make_float2(rS(i), rS(i + 1));
    else *reinterpret_cast<uint32_t*>(ptr) = pack2<T>(rS(i), rS(i + 1));
  }
}

}  // namespace gla
