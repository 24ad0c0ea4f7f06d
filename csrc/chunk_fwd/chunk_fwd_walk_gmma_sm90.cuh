// The per-chunk MMAs of the Hopper walks (chunk_fwd_twostage_walk_sm90.cu, chunk_fwd_fused_sm90.cu) for one
// warpgroup and 64 rows of V, with the state kept as S^T in the accumulator of the update's wgmma:
//   acc = (exp2(b_0) S)^T qx^T + v^T A^T     (acc: o^T of those rows, cleared first)
//   S^T = S^T exp2(G)                         (then update(), S^T += v^T kd, issued with the last part)
// The first product takes the state as wgmma's register operand, a part (K / kParts channels) at a
// time: the accumulator layout of S^T is the register-operand layout, k-block j of a part being
// rS(8 j .. 8 j + 7) of that part.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>

namespace gla {

// rS: this warpgroup's 64 rows of S^T (tUc their (row, channel) coordinates); rS_all: every
// fragment update() writes (fenced around the MMAs). tOrS: one part's register operand; tOrX: qx
// as wgmma's B; tVrV, tVrA: v^T and A; sB0, sGam: exp2(b_0) and exp2(G) per channel (smem).
template <int kParts, int C, class MmaO, class MmaV, class FragS, class FragAll, class Coord, class OpS, class FragX,
          class FragV, class FragA, class Acc, class Update>
__device__ __forceinline__ void walk_chunk_mmas(const MmaO& mmaO, const MmaV& mmaV, FragS&& rS, FragAll& rS_all,
                                                const Coord& tUc, OpS& tOrS, const FragX& tOrX, const FragV& tVrV,
                                                const FragA& tVrA, Acc& acc, const float* sB0, const float* sGam,
                                                Update&& update) {
  using namespace cute;
  using T = typename OpS::value_type;
  constexpr int kPart = decltype(size(tOrS))::value;
  constexpr int kBlocks = decltype(size<2>(tOrS))::value;  // k-blocks of 16 channels per part
  static_assert(kParts * kPart == decltype(size(rS))::value, "state fragments");
  clear(acc);
  CUTE_UNROLL
  for (int part = 0; part < kParts; ++part) {
    CUTE_UNROLL
    for (int i = 0; i < kPart; i += 2) {  // (i, i + 1): adjacent channels; then S^T exp2(G)
      const int r = part * kPart + i, ch = get<1>(tUc(r));
      const float2 e = *reinterpret_cast<const float2*>(sB0 + ch), gam = *reinterpret_cast<const float2*>(sGam + ch);
      tOrS(i) = T(rS(r) * e.x);
      tOrS(i + 1) = T(rS(r + 1) * e.y);
      rS(r) *= gam.x;
      rS(r + 1) *= gam.y;
    }
    warpgroup_fence_operand(tOrS);
    warpgroup_fence_operand(acc);
    warpgroup_fence_operand(rS_all);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int j = 0; j < kBlocks; ++j) gemm(mmaO, tOrS(_, _, j), tOrX(_, _, part * kBlocks + j), acc);
    if (part == kParts - 1) {
      CUTE_UNROLL
      for (int j = 0; j < C / 16; ++j) gemm(mmaV, tVrV(_, _, j), tVrA(_, _, j), acc);  // + v^T A^T
      update();
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrS);
    warpgroup_fence_operand(acc);
    warpgroup_fence_operand(rS_all);
  }
}

}  // namespace gla
