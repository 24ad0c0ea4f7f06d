// The smem -> register -> tensor-core MMA loop shared by the chunked kernels.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>

namespace gla {

// The tensor-core MMA (16 x 8 x 16, float32 accumulators) for 16-bit inputs of type T.
template <class T> struct MmaAtomFor;
template <> struct MmaAtomFor<cute::bfloat16_t> { using type = cute::SM80_16x8x16_F32BF16BF16F32_TN; };
template <> struct MmaAtomFor<cute::half_t> { using type = cute::SM80_16x8x16_F32F16F16F32_TN; };

// acc += A B^T for shared-memory tiles A (M x Kd) and B (N x Kd) of element type T: per k-block
// of the tiled MMA, both operands go to registers through the ldmatrix atoms CopyA and CopyB
// (SM75_U32x4_LDSM_N for a K-contiguous tile, SM75_U16x8_LDSM_T for an M/N-contiguous one).
// Only the k-blocks kb_begin <= kk < kb_end (causal products skip the blocks that are zero);
// gate_b(rB, kk) may rescale B's registers of k-block kk before its MMA (operands gated in
// registers).
struct NoGate {
  template <class R>
  __device__ __forceinline__ void operator()(R&, int) const {}
};
template <class CopyA, class CopyB, class T, class Mma, class SA, class SB, class Acc, class GateB = NoGate>
__device__ __forceinline__ void gemm_smem(const Mma& mma, const SA& sA, const SB& sB, Acc& acc, int tid,
                                          int kb_begin = 0, int kb_end = 1 << 30, GateB gate_b = {}) {
  using namespace cute;
  auto thr = mma.get_thread_slice(tid);
  Tensor rA = thr.partition_fragment_A(sA);
  Tensor rB = thr.partition_fragment_B(sB);
  auto cpA = make_tiled_copy_A(Copy_Atom<CopyA, T>{}, mma);
  auto cpB = make_tiled_copy_B(Copy_Atom<CopyB, T>{}, mma);
  auto tA = cpA.get_thread_slice(tid);
  auto tB = cpB.get_thread_slice(tid);
  Tensor sA_ = tA.partition_S(sA);
  Tensor rA_ = tA.retile_D(rA);
  Tensor sB_ = tB.partition_S(sB);
  Tensor rB_ = tB.retile_D(rB);
  CUTE_UNROLL
  for (int kk = 0; kk < size<2>(rA); ++kk) {
    if (kk >= kb_begin && kk < kb_end) {
      copy(cpA, sA_(_, _, kk), rA_(_, _, kk));
      copy(cpB, sB_(_, _, kk), rB_(_, _, kk));
      gate_b(rB, kk);
      gemm(mma, acc, rA(_, _, kk), rB(_, _, kk), acc);
    }
  }
}

}  // namespace gla
