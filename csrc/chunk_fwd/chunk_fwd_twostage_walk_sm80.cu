// Stage 2 of the two-stage forward (chunk_fwd_config.h, two_stage): one CTA (8 warps) per
// (sequence, head, V tile of BV, segment) walks the chunks with the K x BV state in float32
// registers, reading what the prep kernel (chunk_fwd_twostage_prep.cu) wrote: the scores A, qx = scale q
// exp2(b - b_0), kd = k exp2(G - b) and the decays. Per chunk there is no exp and no cumsum,
// only MMAs:
//   o = qx (exp2(b_0) S) + A v      (S scaled per row and rounded to the input dtype in smem)
//   S = exp2(G) S + kd^T v
// The next chunk's qx, kd, v, A and decays load (cp.async, double-buffered) during the current one.
// Segment splitting as in the fused kernel (blockIdx.z; pass 1 is chunk_fwd_segment_pass.cu).
#include <cute/tensor.hpp>

#include "chunk_fwd_config.h"
#include "chunk_fwd_state.cuh"
#include "cute_gemm.cuh"
#include "device_common.cuh"

namespace gla {
namespace chunk_walk_detail {

using namespace cute;

template <class T, int K, int BV, bool kSave, int kPool>
struct Walk {
  static constexpr int C = chunk_fwd_cfg::kChunk, NT = chunk_fwd_cfg::kThreads;
  static constexpr int LDQ = K + 8, LDV = BV + 8, LDA = C + 8, LDS = BV + 8;
  // per stage: qx, kd [C][LDQ], v [C][LDV], A [C][LDA], then exp2(G), exp2(b_0) [K] float
  static constexpr int kOffD = C * LDQ * 2, kOffV = 2 * kOffD, kOffA = kOffV + C * LDV * 2,
                       kOffDec = kOffA + C * LDA * 2, kStage = kOffDec + 2 * K * 4;
  static constexpr int kOffS = 2 * kStage, kSmem = kOffS + K * LDS * 2;  // S [K][LDS] (input dtype)
  static_assert(kSmem == chunk_fwd_cfg::walk_smem_bytes(K, BV), "smem layout");
  static_assert(K % 128 == 0 && BV % 64 == 0, "K in {128, 256}, BV multiple of 64");

  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  // output tile 64 x BV: 4 warps along the chunk, 2 along V (as the fused kernel)
  using MmaO = decltype(make_tiled_mma(Atom{}, Layout<Shape<_4, _2, _1>>{}, Tile<_64, _32, _16>{}));
  // state tile K x BV: 8 warps along K
  using MmaU = decltype(make_tiled_mma(Atom{}, Layout<Shape<_8, _1, _1>>{}, Tile<_128, _16, _16>{}));

  static __device__ void run(const FwdParams& p, const chunk_fwd_cfg::Split& sp, unsigned char* smem) {
    auto stage = [&](int c) { return smem + (c & 1) * kStage; };
    T* sS = reinterpret_cast<T*>(smem + kOffS);
    const int tid = threadIdx.x, warp = tid / 32;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H, vt = blockIdx.y, seg = blockIdx.z;
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    int64_t len = eos > bos ? eos - bos : 0;
    const int last_seg = clip_to_segment(sp, seg, bos, len);
    if (last_seg < 0) return;
    if (kPool != chunk_fwd_cfg::kNoPool && padded_sequence(p, n)) {  // pooled call: zeros out, no slot touched
      zero_output<T, BV>(p, h, vt, bos, len);
      return;
    }
    const int nchunks = int((len + C - 1) / C);
    const int64_t slot0 = chunk_fwd_cfg::slot_base(p, n) + (sp.seg_len > 0 ? int64_t(seg) * (sp.seg_len / C) : 0);
    const int64_t HK = int64_t(p.H) * K, HV = int64_t(p.H) * p.V, HC = int64_t(p.H) * C;
    const T* xb = static_cast<const T*>(p.save_qx) + bos * HK + int64_t(h) * K;
    const T* db = static_cast<const T*>(p.save_kd) + bos * HK + int64_t(h) * K;
    const T* ab = static_cast<const T*>(p.save_a) + bos * HC + int64_t(h) * C;
    const T* vb = static_cast<const T*>(p.v) + bos * HV + int64_t(h) * p.V + vt * BV;
    T* ob = static_cast<T*>(p.o) + bos * HV + int64_t(h) * p.V + vt * BV;
    auto rows_in = [&](int c) { return int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C); };

    auto load = [&](int c) {
      unsigned char* st = stage(c);
      const int64_t t0 = int64_t(c) * C;
      const int Lr = rows_in(c);
      load_tile<NT, C, K>(reinterpret_cast<T*>(st), LDQ, xb + t0 * HK, HK, Lr, tid);
      load_tile<NT, C, K>(reinterpret_cast<T*>(st + kOffD), LDQ, db + t0 * HK, HK, Lr, tid);
      load_tile<NT, C, BV>(reinterpret_cast<T*>(st + kOffV), LDV, vb + t0 * HV, HV, Lr, tid);
      load_tile<NT, C, C>(reinterpret_cast<T*>(st + kOffA), LDA, ab + t0 * HC, HC, Lr, tid);
      // exp2(G) and exp2(b_0): rows 0 and 2 of the slot's decays
      const float* dec = p.save_decay + ((slot0 + c) * p.H + h) * 3 * K;
      load_tile<NT, 2, K>(reinterpret_cast<float*>(st + kOffDec), K, dec, 2 * K, 2, tid);
      cp_async_commit();
    };

    MmaU mmaU;
    auto thrU = mmaU.get_thread_slice(tid);
    Tensor rS = partition_fragment_C(mmaU, Shape<Int<K>, Int<BV>>{});
    Tensor tUc = thrU.partition_C(make_identity_tensor(Shape<Int<K>, Int<BV>>{}));
    Tensor tUsS = thrU.partition_C(make_tensor(make_smem_ptr(sS),
                                               make_layout(Shape<Int<K>, Int<BV>>{}, make_stride(Int<LDS>{}, _1{}))));
    load_initial_state<K, BV, false, kPool != chunk_fwd_cfg::kNoPool>(p, sp, n, h, vt, seg, rS, tUc);
    CheckpointCursor ckpt(p);

    // operand views (stage-independent layouts)
    auto lqk = make_layout(Shape<Int<C>, Int<K>>{}, make_stride(Int<LDQ>{}, _1{}));
    auto lkdT = make_layout(Shape<Int<K>, Int<C>>{}, make_stride(_1{}, Int<LDQ>{}));  // kd^T (K-contiguous in smem)
    auto lvT = make_layout(Shape<Int<BV>, Int<C>>{}, make_stride(_1{}, Int<LDV>{}));
    auto la = make_layout(Shape<Int<C>, Int<C>>{}, make_stride(Int<LDA>{}, _1{}));
    Tensor sSt = make_tensor(make_smem_ptr(sS), make_layout(Shape<Int<BV>, Int<K>>{}, make_stride(_1{}, Int<LDS>{})));

    if (nchunks > 0) load(0);
    for (int c = 0; c < nchunks; ++c) {
      unsigned char* st = stage(c);
      const float* sGam = reinterpret_cast<const float*>(st + kOffDec);
      const float* sB0 = sGam + K;
      cp_async_wait<0>();
      __syncthreads();  // chunk c landed; chunk c - 1 (its stage, S) no longer read
      if (c + 1 < nchunks) load(c + 1);
      if constexpr (kSave)  // the state entering this chunk
        store_state<T>(static_cast<typename KeptState<T>::type*>(p.save_h) + ((slot0 + c) * p.H + h) * K * p.V + vt * BV,
                       p.V, rS, tUc);
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV>(p, n, h, vt, int64_t(c) * C, rS, tUc);
      CUTE_UNROLL
      for (int i = 0; i < size(rS); i += 2) {
        const float e = sB0[get<0>(tUc(i))];
        *reinterpret_cast<uint32_t*>(&tUsS(i)) = pack2<T>(rS(i) * e, rS(i + 1) * e);
      }
      __syncthreads();

      // o = qx (exp2(b_0) S) + A v (key blocks 0..wi only: A is zero above the diagonal)
      {
        MmaO mmaO;
        auto thr = mmaO.get_thread_slice(tid);
        Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<T*>(st + kOffV)), lvT);
        Tensor acc = partition_fragment_C(mmaO, Shape<Int<C>, Int<BV>>{});
        clear(acc);
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mmaO, make_tensor(make_smem_ptr(reinterpret_cast<T*>(st)), lqk),
                                                          sSt, acc, tid);
        gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mmaO, make_tensor(make_smem_ptr(reinterpret_cast<T*>(st + kOffA)), la),
                                                          sVt, acc, tid, 0, warp % 4 + 1);
        store_output<T, C, BV>(ob + int64_t(c) * C * HV, HV, rows_in(c), thr, acc);
      }

      // S = exp2(G) S + kd^T v
      CUTE_UNROLL
      for (int i = 0; i < size(rS); ++i) rS(i) *= sGam[get<0>(tUc(i))];
      gemm_smem<SM75_U16x8_LDSM_T, SM75_U16x8_LDSM_T, T>(
          mmaU, make_tensor(make_smem_ptr(reinterpret_cast<T*>(st + kOffD)), lkdT),
          make_tensor(make_smem_ptr(reinterpret_cast<T*>(st + kOffV)), lvT), rS, tid);
    }

    if (seg == last_seg) {
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV>(p, n, h, vt, len, rS, tUc);
      store_final_state<K, BV, false, kPool != chunk_fwd_cfg::kNoPool>(p, n, h, vt, rS, tUc);
    }
  }
};

template <class T, int K, int BV, bool kSave, int kPool>
__global__ void __launch_bounds__(chunk_fwd_cfg::kThreads, 1)
    chunk_walk_kernel(const FwdParams p, const chunk_fwd_cfg::Split sp) {
  extern __shared__ __align__(128) unsigned char smem[];
  Walk<T, K, BV, kSave, kPool>::run(p, sp, smem);
}

template <class T, int K, int BV, bool kSave, int kPool>
cudaError_t launch(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return launch_walk(&chunk_walk_kernel<T, K, BV, kSave, kPool>, Walk<T, K, BV, kSave, kPool>::kSmem, BV, p, sp,
                     stream);
}

template <class T>
cudaError_t dispatch_save(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return chunk_fwd_cfg::launch_walk_for(p, p.save_h != nullptr, [&](auto save, auto pool) {
    return launch<T, 256, 64, decltype(save)::value, decltype(pool)::value>(p, sp, stream);
  });
}

}  // namespace chunk_walk_detail

cudaError_t run_chunk_walk(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  using namespace chunk_walk_detail;
  if (p.K != 256 || chunk_fwd_cfg::block_v(p.K, p.V) != 64) return cudaErrorInvalidValue;
  if (p.dtype == DType::kBFloat16) return dispatch_save<cute::bfloat16_t>(p, sp, stream);
  if (p.dtype == DType::kFloat16) return dispatch_save<cute::half_t>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gla
