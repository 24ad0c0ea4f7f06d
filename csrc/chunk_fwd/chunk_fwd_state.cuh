// Shared by the chunked forward's sequence walks (the fused kernels and the two-stage walks): where
// a sequence's states live (its own h0 / ht, or the slots of a pool), the register-resident
// state's initial value and its final and checkpoint stores (rS, tUc and kT as in state_tile.cuh),
// the output store, the launch.
#pragma once

#include <cute/tensor.hpp>

#include "chunk_fwd_config.h"
#include "device_common.cuh"
#include "gla_params.h"
#include "state_tile.cuh"

namespace gla {

// ---- where a sequence's states live: its own h0 / ht, or pool slots (FwdParams::slot_in, ...)

__device__ __forceinline__ int64_t pool_slot(const void* slots, bool int64, int64_t i) {
  return int64 ? static_cast<const int64_t*>(slots)[i] : int64_t(static_cast<const int32_t*>(slots)[i]);
}

// Padding in a pooled call: the sequence's start slot is outside the pool.
__device__ __forceinline__ bool padded_sequence(const FwdParams& p, int n) {
  if (p.slot_in == nullptr) return false;
  const int64_t s = pool_slot(p.slot_in, p.slot_in_int64, n);
  return s < 0 || s >= p.P;
}

// The [K, V] (or [V, K]) state of pool slot `slot` and head h; nullptr if the slot is outside the pool.
template <class F>
__device__ __forceinline__ F* state_at(const FwdParams& p, F* base, int64_t slot, int h, int K) {
  if (slot < 0 || slot >= p.P) return nullptr;
  return base + (slot * p.H + h) * int64_t(K) * p.V;
}

// Sequence n's initial state for head h, or nullptr: start from zeros. kPool: a pooled call's
// kernel (its own instantiation, so that the other walks carry none of the pool's code).
template <int K, bool kPool>
__device__ __forceinline__ const float* initial_state_of(const FwdParams& p, int n, int h) {
  if constexpr (!kPool) {
    return p.h0 == nullptr ? nullptr : p.h0 + (int64_t(n) * p.H + h) * K * p.V;
  } else {
    if (p.has_h0 != nullptr && !p.has_h0[n]) return nullptr;
    return state_at(p, p.h0, pool_slot(p.slot_in, p.slot_in_int64, n), h, K);
  }
}

// Element i of the register tile rS (V tile vt; coordinates tUc as in state_tile.cuh) in a state
// stored [V, K] (state_v_first; state_offset has the [K, V] one).
template <int K, int BV, bool kT, class Coord>
__device__ __forceinline__ int64_t v_first_offset(const Coord& tUc, int i, int vt) {
  const int kk = cute::get<kT ? 1 : 0>(tUc(i)), vv = cute::get<kT ? 0 : 1>(tUc(i));
  return (int64_t(vt) * BV + vv) * K + kk;
}

// rS (float32) into the state at dst: float2 stores where the layout keeps pairs adjacent.
template <int K, int BV, bool kT, class Frag, class Coord>
__device__ __forceinline__ void store_state_tile(const FwdParams& p, float* dst, int vt, const Frag& rS,
                                                 const Coord& tUc) {
  if (!p.state_v_first) {
    store_state<float, kT>(dst + int64_t(vt) * BV, p.V, rS, tUc);
    return;
  }
  CUTE_UNROLL
  for (int i = 0; i < cute::size(rS); ++i) dst[v_first_offset<K, BV, kT>(tUc, i, vt)] = rS(i);
}

// h0 (or zero), then, in pass 2 of a split, the end states of the segments before `seg`
// composed in order: S = exp(sum g over segment j) S + S_j.
template <int K, int BV, bool kT, bool kPool, class Frag, class Coord>
__device__ __forceinline__ void load_initial_state(const FwdParams& p, const chunk_fwd_cfg::Split& sp, int n, int h,
                                                   int vt, int seg, Frag& rS, const Coord& tUc) {
  using namespace cute;
  constexpr int step = kT ? 1 : 2;  // float2 loads where the pairs are adjacent columns
  if (const float* h0 = initial_state_of<K, kPool>(p, n, h)) {
    if (kPool && p.state_v_first) {
      CUTE_UNROLL
      for (int i = 0; i < size(rS); ++i) rS(i) = h0[v_first_offset<K, BV, kT>(tUc, i, vt)];
    } else {
      h0 += int64_t(vt) * BV;
      CUTE_UNROLL
      for (int i = 0; i < size(rS); i += step) {
        const float* src = h0 + state_offset<kT>(tUc, i, p.V);
        if constexpr (kT) {
          rS(i) = *src;
        } else {
          const float2 x = *reinterpret_cast<const float2*>(src);
          rS(i) = x.x;
          rS(i + 1) = x.y;
        }
      }
    }
  } else {
    clear(rS);
  }
  const int64_t nh = int64_t(n) * p.H + h;
  for (int j = 0; j < seg; ++j) {
    const float* Sj = sp.ws_state + (nh * sp.nseg + j) * K * p.V + int64_t(vt) * BV;
    const float* Dj = sp.ws_decay + (nh * sp.nseg + j) * K;
    CUTE_UNROLL
    for (int i = 0; i < size(rS); i += step) {
      const float dk = Dj[get<kT ? 1 : 0>(tUc(i))];
      const float* src = Sj + state_offset<kT>(tUc, i, p.V);
      if constexpr (kT) {
        rS(i) = dk * rS(i) + *src;
      } else {
        const float2 x = *reinterpret_cast<const float2*>(src);
        rS(i) = dk * rS(i) + x.x;
        rS(i + 1) = dk * rS(i + 1) + x.y;
      }
    }
  }
}

// The state after the sequence's last token (rS in the walk of its last segment): to ht, or to
// the slot slot_out names.
template <int K, int BV, bool kT, bool kPool, class Frag, class Coord>
__device__ __forceinline__ void store_final_state(const FwdParams& p, int n, int h, int vt, const Frag& rS,
                                                  const Coord& tUc) {
  if (p.ht == nullptr) return;
  if constexpr (!kPool) {
    store_state<float, kT>(p.ht + (int64_t(n) * p.H + h) * K * p.V + int64_t(vt) * BV, p.V, rS, tUc);
  } else {
    float* dst = state_at(p, p.ht, pool_slot(p.slot_out, p.slot_out_int64, n), h, K);
    if (dst != nullptr) store_state_tile<K, BV, kT>(p, dst, vt, rS, tUc);
  }
}

// A pooled call's checkpoints along one walk: the state after every ckpt_every tokens goes to
// slot ckpt_slots[n, j]. The walk offers its state at every chunk boundary and after its last
// chunk, in order; the cursor counts the marks off (one compare per chunk, no division).
struct CheckpointCursor {
  int next;  // the token count of the next mark (positions < 2^31); 0: none
  int j;
  __device__ __forceinline__ explicit CheckpointCursor(const FwdParams& p)
      : next(p.ckpt_slots != nullptr && p.ckpt_count > 0 ? p.ckpt_every : 0), j(0) {}

  // rS is the state after the first `pos` tokens of sequence n (an unsplit walk).
  template <int K, int BV, bool kT = false, class Frag, class Coord>
  __device__ __forceinline__ void offer(const FwdParams& p, int n, int h, int vt, int64_t pos, const Frag& rS,
                                        const Coord& tUc) {
    if (next == 0 || pos != next) return;
    float* dst = state_at(p, p.ht, pool_slot(p.ckpt_slots, p.ckpt_int64, int64_t(n) * p.ckpt_count + j), h, K);
    if (dst != nullptr) store_state_tile<K, BV, kT>(p, dst, vt, rS, tUc);
    next = ++j < p.ckpt_count ? next + p.ckpt_every : 0;
  }
};

// A padding sequence of a pooled call: this CTA writes zeros to its rows and V columns of o
// (len rows from token bos) and nothing else. Called by every thread of the CTA.
template <class T, int BV>
__device__ __forceinline__ void zero_output(const FwdParams& p, int h, int vt, int64_t bos, int64_t len) {
  const int64_t HV = int64_t(p.H) * p.V;
  T* ob = static_cast<T*>(p.o) + bos * HV + int64_t(h) * p.V + int64_t(vt) * BV;
  for (int64_t i = threadIdx.x; i < len * (BV / 8); i += blockDim.x)
    *reinterpret_cast<uint4*>(ob + (i / (BV / 8)) * HV + (i % (BV / 8)) * 8) = make_uint4(0u, 0u, 0u, 0u);
}

// One chunk's output tile (C x BV rows of o, row stride ld; acc the float32 accumulator of the
// MMA thread slice thr): the rows below `rows`, two columns per 32-bit store.
template <class T, int C, int BV, class ThrMma, class Acc>
__device__ __forceinline__ void store_output(T* o, int64_t ld, int rows, const ThrMma& thr, const Acc& acc) {
  using namespace cute;
  Tensor tOg = thr.partition_C(make_tensor(make_gmem_ptr(o), make_layout(Shape<Int<C>, Int<BV>>{}, make_stride(ld, _1{}))));
  Tensor tOc = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2)
    if (get<0>(tOc(i)) < rows) *reinterpret_cast<uint32_t*>(&tOg(i)) = pack2<T>(acc(i), acc(i + 1));
}

// A walk's grid: (sequence x head, V / BV tiles, segments).
inline dim3 walk_grid(const FwdParams& p, const chunk_fwd_cfg::Split& sp, int BV) {
  return dim3(unsigned(p.N) * unsigned(p.H), unsigned(p.V / BV), sp.seg_len > 0 ? unsigned(sp.nseg) : 1u);
}

// Launches a walk kernel(p, split) over walk_grid, 8 warps per CTA.
template <class Kernel>
cudaError_t launch_walk(Kernel* kernel, int smem, int BV, const FwdParams& p, const chunk_fwd_cfg::Split& sp,
                        cudaStream_t stream) {
  const dim3 grid = walk_grid(p, sp, BV);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, chunk_fwd_cfg::kThreads, smem, stream>>>(p, sp);
  return cudaGetLastError();
}

}  // namespace gla
