// The backward's state-gradient walk, from the training forward's intermediates.
//
// One CTA (8 warps) per (sequence, head, 64-channel tile of K, 64-column tile of V) walks the
// chunks last to first with dS, the gradient with respect to the state at the end of the
// current chunk (64 x 64 float32, MMA accumulators), seeded with the final-state gradient.
// Per chunk: dS goes to the workspace dh[slot] (in the kept states' type, KeptState: the
// dq/dk/dg and dv kernels read it), then
//   dS = (dS exp(Gamma - b_0) + qx^T do) exp(b_0),   qx = scale q exp(b - b_0)   (saved)
// exp(b_0) is applied in float32 after the product, so no factor below the input dtype's range
// is rounded to it. After the first chunk dS is d(initial state). The next chunk's qx, do and
// decays come in by cp.async (two stages) while this one's product runs.
//
// Few walks (small batch x heads, long sequences) are split into segments (gla_params.h,
// SegmentSplit; grid y = segment): pass 1 (kLocal) walks every segment but the first from
// zero, storing nothing per chunk, and leaves in the workspace the dS it hands to the segment
// before it and its decay exp(sum g); pass 2 starts each segment from dht composed with those
// of the segments after it, dS = exp(sum g over segment j) dS + dS_j, j from the last down.
#pragma once

#include <cute/tensor.hpp>

#include "cute_gemm.cuh"
#include "device_common.cuh"
#include "state_tile.cuh"
#include "chunk_bwd_config.h"

namespace gla {
namespace chunk_bwd_detail {

using namespace cute;

template <class T, bool kLocal>
struct DhWalk {
  static constexpr int C = chunk_bwd_cfg::kChunk, NT = chunk_bwd_cfg::kWalkThreads, BK = 64, BV = 64;
  static constexpr chunk_bwd_cfg::WalkSmem L{};
  static constexpr int LD = L.ld();
  using HT = typename KeptState<T>::type;  // dh: float32 for float16 inputs
  static constexpr bool kFloatDh = cute::is_same_v<HT, float>;
  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  // the 64 x 64 tile: warp w owns rows (channels) 16 (w % 4) .. and every other 16-column group
  using Mma = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));

  static __device__ void run(const BwdParams& p, const SegmentSplit& sp, unsigned char* smem) {
    const int tid = threadIdx.x;
    // the tiles of one (sequence, head) are neighbours in the grid: they share qx and do through L2
    const int tiles = (p.K / BK) * (p.V / BV), tile = int(blockIdx.x % tiles);
    const int64_t nh = blockIdx.x / tiles;
    const int n = int(nh / p.H), hh = int(nh % p.H), kt = tile / (p.V / BV), vt = tile % (p.V / BV);
    const int seg = int(blockIdx.y) + (kLocal ? 1 : 0);
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    int64_t len = eos > bos ? eos - bos : 0;
    const int last = clip_to_segment(sp, seg, bos, len);
    if (last < 0) return;
    const int nchunks = int((len + C - 1) / C);
    const int64_t slot0 = p.chunk_off[n] + int64_t(seg) * sp.seg_len / C;  // the segment's first chunk
    const int64_t HK = int64_t(p.H) * p.K, HV = int64_t(p.H) * p.V;
    const T* qxb = static_cast<const T*>(p.saved_qx) + bos * HK + int64_t(hh) * p.K + kt * BK;
    const T* dob = static_cast<const T*>(p.dout) + bos * HV + int64_t(hh) * p.V + vt * BV;
    T* sOut = reinterpret_cast<T*>(smem + L.off_out());
    constexpr int kStage = L.stage_bytes(), kDo = L.off_do(), kE = L.off_e();
    auto sQx = [&](int s) { return reinterpret_cast<T*>(smem + s * kStage); };
    auto sDo = [&](int s) { return reinterpret_cast<T*>(smem + s * kStage + kDo); };
    auto sE = [&](int s) { return reinterpret_cast<float*>(smem + s * kStage + kE); };
    auto load = [&](int c) {
      const int s = c & 1;
      const int rows = int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C);
      load_tile<NT, C, BK>(sQx(s), LD, qxb + int64_t(c) * C * HK, HK, rows, tid);
      load_tile<NT, C, BV>(sDo(s), LD, dob + int64_t(c) * C * HV, HV, rows, tid);
      // decays [3][K] of the slot: rows 1 (exp(Gamma - b_0)) and 2 (exp(b_0)) of this tile
      const float* dec = p.saved_decay + ((slot0 + c) * p.H + hh) * 3 * p.K + p.K + kt * BK;
      load_tile<NT, 2, BK>(sE(s), BK, dec, p.K, 2, tid);
      cp_async_commit();
    };

    Mma mma;
    auto thr = mma.get_thread_slice(tid);
    Tensor acc = partition_fragment_C(mma, Shape<Int<BK>, Int<BV>>{});
    Tensor tc = thr.partition_C(make_identity_tensor(Shape<Int<BK>, Int<BV>>{}));
    const int64_t soff = ((int64_t(n) * p.H + hh) * p.K + kt * BK) * p.V + vt * BV;  // [N, H, K, V]
    // [N * H, nseg, K, V] and [N * H, nseg, K]: this segment's pass-1 results
    auto ws_state = [&](int j) { return sp.ws_state + ((nh * sp.nseg + j) * p.K + kt * BK) * p.V + vt * BV; };
    auto ws_decay = [&](int j) { return sp.ws_decay + (nh * sp.nseg + j) * p.K + kt * BK; };
    clear(acc);
    if (!kLocal && p.dht != nullptr) add_tile(acc, tc, p.dht + soff, p.V, nullptr);
    if (!kLocal)
      for (int j = last; j > seg; --j) add_tile(acc, tc, ws_state(j), p.V, ws_decay(j));
    // A = qx^T (channel, token) and B = do^T (column, token): both token-major in smem
    auto lT = make_layout(Shape<_64, Int<C>>{}, make_stride(_1{}, Int<LD>{}));
    float decay = 1.f;  // pass 1: the segment's exp(sum g) of channel tid (tid < BK)
    if (nchunks > 0) load(nchunks - 1);
    for (int c = nchunks - 1; c >= 0; --c) {
      const int s = c & 1;
      if (!kLocal && !kFloatDh) {  // staged for 16-byte stores
        CUTE_UNROLL
        for (int i = 0; i < size(acc); i += 2)
          *reinterpret_cast<uint32_t*>(sOut + get<0>(tc(i)) * LD + get<1>(tc(i))) = pack2<T>(acc(i), acc(i + 1));
      }
      if (c > 0) {
        load(c - 1);  // into the other stage, free since the previous iteration's last barrier
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // this chunk's stage has landed; sOut is written
      const float* e = sE(s);
      if (!kLocal) {
        HT* dh = static_cast<HT*>(p.dh) + (((slot0 + c) * p.H + hh) * p.K + kt * BK) * p.V + vt * BV;
        if constexpr (kFloatDh) store_state<T>(dh, p.V, acc, tc);
        else store_tile<NT, BK, BV>(dh, p.V, sOut, LD, BK, tid);
      } else if (tid < BK) {
        decay *= e[tid] * e[BK + tid];
      }
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) acc(i) *= e[get<0>(tc(i))];
      gemm_smem<SM75_U16x8_LDSM_T, SM75_U16x8_LDSM_T, T>(mma, make_tensor(make_smem_ptr(sQx(s)), lT),
                                                         make_tensor(make_smem_ptr(sDo(s)), lT), acc, tid);
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) acc(i) *= e[BK + get<0>(tc(i))];
      __syncthreads();  // the stage and sOut are free
    }
    if (kLocal) {
      store_state<T>(ws_state(seg), p.V, acc, tc);
      if (vt == 0 && tid < BK) ws_decay(seg)[tid] = decay;
    } else if (p.dh0 != nullptr && seg == 0) {
      store_state<T>(p.dh0 + soff, p.V, acc, tc);
    }
  }

  // acc = d * acc + x (d per row, 1 without d) for a float32 [64, 64] tile x of row stride ld
  template <class Acc, class Coord>
  static __device__ void add_tile(Acc& acc, const Coord& tc, const float* x, int64_t ld, const float* d) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int r = get<0>(tc(i));
      const float2 v = *reinterpret_cast<const float2*>(x + int64_t(r) * ld + get<1>(tc(i)));
      const float f = d != nullptr ? d[r] : 1.f;
      acc(i) = f * acc(i) + v.x;
      acc(i + 1) = f * acc(i + 1) + v.y;
    }
  }
};

// 8 warps, two CTAs per SM (<= 128 registers). Measured against 4 warps at four CTAs per SM
// (H100, bf16, backward alone): (2, 8192, 16, 128, 128) 0.750 / 0.816 ms (the walk 0.136 / 0.199:
// one walk per SM has twice the warps to hide its latency), (8, 2048) 0.729 / 0.748.
template <class T, bool kLocal>
__global__ void __launch_bounds__(chunk_bwd_cfg::kWalkThreads, 2)
    chunk_bwd_dh_kernel(const BwdParams p, const SegmentSplit sp) {
  extern __shared__ __align__(128) unsigned char smem[];
  DhWalk<T, kLocal>::run(p, sp, smem);
}

}  // namespace chunk_bwd_detail
}  // namespace gla
