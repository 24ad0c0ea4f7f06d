// Stage 2 of the two-stage forward on Hopper (sm_90a): the walk of chunk_fwd_twostage_walk_sm80.cu with
// warpgroup MMAs (wgmma), TMA loads and the state kept transposed, S^T (BV x K, float32), so
// that it feeds the output MMA straight from registers (K = 256, and K = 128 in training). A CTA
// takes a V tile of 128; its two warpgroups own 64 columns of V each (64 rows of S^T: K / 2
// floats per thread), so neither needs the other's results:
//   o^T (64 x C)  = (exp2(b_0) S)^T qx^T + v^T A^T   (the first product in parts of K, the
//                                                    register operand built per part)
//   S^T (64 x K)  = S^T exp2(G) + v^T kd
// (the accumulator layout of S^T is the register-operand layout of wgmma, so the state never
// goes through shared memory). With 128 columns per CTA a (8, 2048, 4, 256, 512) grid is 128
// CTAs, one wave, each reading qx, kd and A once for 128 columns.
// Loads: per chunk, 64 x 64 boxes with the 128-byte swizzle (the wgmma layouts), by TMA. The V
// tiles of one (sequence, head) read the same qx, kd and A: pairs of them form a cluster and
// each of those boxes is loaded once per cluster, multicast (a CTA issues boxes rank,
// rank + 2, ...). Larger clusters of these one-CTA-per-SM kernels fit fewer at once (30 of 4,
// 15 of 8 on the H100). v (its own boxes) and the decays (a bulk copy) are per CTA. Two
// stages: a stage's "full" barrier completes when all its bytes landed, its "empty" barrier
// when every warp of the cluster is done with it (remote arrivals), before a CTA issues its
// loads of the chunk after next into it. The output goes through smem (double-buffered, one
// warpgroup barrier per chunk) to row-wise 16-byte stores.
#include "chunk_fwd_tma_sm90.h"  // first: cudaTypedefs.h before the CUTLASS headers

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/cluster_sm90.hpp>
#include <cutlass/arch/barrier.h>

#include "chunk_fwd_config.h"
#include "chunk_fwd_state.cuh"
#include "chunk_fwd_walk_gmma_sm90.cuh"
#include "device_common.cuh"

namespace gla {
namespace chunk_walk_sm90_detail {

using namespace cute;
using Barrier = cutlass::arch::ClusterTransactionBarrier;

// TMA descriptors: qx, kd (rows x H x K), A (rows x H x C) and v (rows x H x V), boxes of 64
// columns x 1 head x 64 rows (token rows past the tensor read as zero).
struct WalkMaps {
  CUtensorMap x, d, a, v;
};

constexpr int kMaxCluster = 2;

template <class T, int K, int BV, bool kSave, int kPool>
struct WalkGmma {
  static constexpr int C = chunk_fwd_cfg::kChunk, NT = chunk_fwd_cfg::kThreads, kWarps = NT / 32;
  static constexpr int VW = BV / 2, kParts = 4, KH = K / kParts;  // V columns per warpgroup; channels per part of o's MMA
  using LX = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<C>, Int<K>>{}));    // qx (C, K)
  using LA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<C>, Int<C>>{}));    // A (C, C)
  // kd as (K, C) and v^T as (BV, C), MN-major, tiled along C first: each 64-column block is one TMA box
  using LD = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<K>, Int<C>>{}, Step<_2, _1>{}));
  using LV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<BV>, Int<C>>{}, Step<_2, _1>{}));
  using LVW = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<VW>, Int<C>>{}));  // a warpgroup's v^T
  // per stage: qx, kd, A, v (TMA boxes of 8 KB), the decays [3][K] float; then two output tiles
  // [C][BV + 8] (16-bit) and the barriers
  static constexpr int kBox = C * 64 * 2, kBoxesX = K / 64, kShared = 2 * kBoxesX + 1;
  static constexpr int kOffD = C * K * 2, kOffA = kOffD + K * C * 2, kOffV = kOffA + C * C * 2,
                       kOffDec = kOffV + BV * C * 2, kDecBytes = 3 * K * 4,
                       kStage = (kOffDec + kDecBytes + 1023) / 1024 * 1024;
  static_assert(kOffD == kBoxesX * kBox && kOffA == 2 * kBoxesX * kBox, "qx, kd, A: consecutive boxes");
  static constexpr int kTx = kShared * kBox + (BV / 64) * kBox + kDecBytes;  // bytes landing per stage
  static constexpr int LDO = BV + 8;
  static constexpr int kOffO = 2 * kStage, kOffBar = kOffO + 2 * C * LDO * 2, kSmem = kOffBar + 64 + 1024;  // + alignment slack
  static_assert(kSmem == chunk_fwd_cfg::walk_sm90_smem_bytes(K, BV), "smem layout");
  static_assert(BV == 128 && K % 128 == 0, "a V tile of 128, K a multiple of 128");

  // S^T update: BV x K, the two warpgroups stacked along V
  using AtomU = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<K>, _16>, GMMA::Major::MN, GMMA::Major::MN>());
  using MmaU = decltype(make_tiled_mma(AtomU{}, Layout<Shape<_2, _1, _1>>{}));
  // o^T, one warpgroup: the state from registers times qx^T; v^T times A^T from smem
  using AtomO = decltype(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<C>, _16>, GMMA::Major::K, GMMA::Major::K>());
  using AtomV = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<C>, _16>, GMMA::Major::MN, GMMA::Major::K>());
  using MmaO = decltype(make_tiled_mma(AtomO{}));
  using MmaV = decltype(make_tiled_mma(AtomV{}));

  static __device__ void run(const FwdParams& p, const chunk_fwd_cfg::Split& sp, const WalkMaps& maps,
                             unsigned char* smem_raw) {
    unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    auto at = [&](int c, int off) { return reinterpret_cast<T*>(smem + (c & 1) * kStage + off); };
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kOffBar);  // [2]
    uint64_t* empty = full + 2;                                    // [2]
    const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H, vt = blockIdx.y, seg = blockIdx.z;
    const int ncta = int(cluster_shape().y), rank = int(block_rank_in_cluster());
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    int64_t len = eos > bos ? eos - bos : 0;
    const int last_seg = clip_to_segment(sp, seg, bos, len);
    if (last_seg < 0) return;  // the whole cluster (same sequence, head, segment) returns
    if (kPool != chunk_fwd_cfg::kNoPool && padded_sequence(p, n)) {  // pooled call: zeros out, no slot touched (the whole cluster)
      zero_output<T, BV>(p, h, vt, bos, len);
      return;
    }
    const int nchunks = int((len + C - 1) / C);
    const int64_t slot0 = chunk_fwd_cfg::slot_base(p, n) + (sp.seg_len > 0 ? int64_t(seg) * (sp.seg_len / C) : 0);
    const int64_t HV = int64_t(p.H) * p.V;
    T* ob = static_cast<T*>(p.o) + bos * HV + int64_t(h) * p.V + vt * BV + wg * VW;  // this warpgroup's columns
    auto rows_in = [&](int c) { return int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C); };

    if (tid == 0) {
      for (int s = 0; s < 2; ++s) {
        Barrier::init(&full[s], 1);
        Barrier::init(&empty[s], kWarps * ncta);
      }
      cutlass::arch::fence_barrier_init();
    }
    cluster_sync();  // the barriers of every CTA are initialised before any load or remote arrival

    // tid 0: chunk c's loads into stage c & 1, once every warp of the cluster is done with the
    // chunk that used it before
    auto issue = [&](int c) {
      const int s = c & 1;
      if (c >= 2) Barrier::wait(&empty[s], ((c >> 1) - 1) & 1);
      Barrier::arrive_and_expect_tx(&full[s], kTx);
      const int32_t t0 = int32_t(bos + int64_t(c) * C);
      const uint64_t hint = uint64_t(TMA::CacheHintSm90::EVICT_FIRST);
      for (int b = rank; b < kShared; b += ncta) {  // qx, kd, A: shared by the cluster
        const CUtensorMap* map = b < kBoxesX ? &maps.x : b < 2 * kBoxesX ? &maps.d : &maps.a;
        T* dst = at(c, b * kBox);  // qx, kd, A lie box after box
        const int32_t col = b < 2 * kBoxesX ? (b % kBoxesX) * 64 : 0;
        if (ncta > 1) SM90_TMA_LOAD_MULTICAST_3D::copy(map, &full[s], uint16_t((1u << ncta) - 1), hint, dst, col, h, t0);
        else SM90_TMA_LOAD_3D::copy(map, &full[s], hint, dst, col, h, t0);
      }
      for (int b = 0; b < BV / 64; ++b)
        SM90_TMA_LOAD_3D::copy(&maps.v, &full[s], hint, at(c, kOffV + b * kBox), int32_t(vt * BV + b * 64), h, t0);
      SM90_BULK_COPY_G2S::copy(p.save_decay + ((slot0 + c) * p.H + h) * 3 * K, &full[s], smem + (c & 1) * kStage + kOffDec,
                               kDecBytes);
    };

    MmaU mmaU;
    auto thrU = mmaU.get_thread_slice(tid);
    Tensor rS = partition_fragment_C(mmaU, Shape<Int<BV>, Int<K>>{});                    // S^T
    Tensor tUc = thrU.partition_C(make_identity_tensor(Shape<Int<BV>, Int<K>>{}));      // (v, channel)
    load_initial_state<K, BV, true, kPool != chunk_fwd_cfg::kNoPool>(p, sp, n, h, vt, seg, rS, tUc);
    CheckpointCursor ckpt(p);

    MmaO mmaO;
    MmaV mmaV;
    auto thrO = mmaO.get_thread_slice(wtid);
    auto thrV = mmaV.get_thread_slice(wtid);
    // a part (K / kParts channels) of the state as the A operand (chunk_fwd_walk_gmma_sm90.cuh)
    Tensor tOrS = make_tensor<T>(partition_shape_A(mmaO, Shape<Int<VW>, Int<KH>>{}));
    Tensor acc = partition_fragment_C(mmaO, Shape<Int<VW>, Int<C>>{});                 // o^T
    Tensor tOc = thrO.partition_C(make_identity_tensor(Shape<Int<VW>, Int<C>>{}));     // (v, t)

    if (tid == 0 && nchunks > 0) issue(0);
    for (int c = 0; c < nchunks; ++c) {
      const int s = c & 1, Lr = rows_in(c);
      const float* sGam = reinterpret_cast<const float*>(smem + s * kStage + kOffDec);  // exp2(G)
      const float* sB0 = sGam + 2 * K;                                                   // exp2(b_0)
      Barrier::wait(&full[s], (c >> 1) & 1);
      if (tid == 0 && c + 1 < nchunks) issue(c + 1);
      if (Lr < C) {  // kd rows past the end (the next sequence's, or never written) add nothing to S
        Tensor sD = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(at(c, kOffD)), LD{}));
        for (int i = tid; i < (C - Lr) * (K / 8); i += NT) {
          const int r = Lr + i / (K / 8), cc = (i % (K / 8)) * 8;
          *reinterpret_cast<uint4*>(raw_pointer_cast(&sD(cc, r))) = make_uint4(0u, 0u, 0u, 0u);
        }
        fence_async_smem();
        __syncthreads();
      }
      if constexpr (kSave)  // the state entering this chunk
        store_state<T, true>(static_cast<typename KeptState<T>::type*>(p.save_h) + ((slot0 + c) * p.H + h) * K * p.V + vt * BV,
                             p.V, rS, tUc);
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV, true>(p, n, h, vt, int64_t(c) * C, rS, tUc);

      Tensor tOrX = thrO.partition_fragment_B(make_tensor(make_smem_ptr(at(c, 0)), LX{}));      // qx as (t, channel)
      Tensor tVrV = thrV.partition_fragment_A(make_tensor(make_smem_ptr(at(c, kOffV) + wg * VW * C), LVW{}));  // v^T
      Tensor tVrA = thrV.partition_fragment_B(make_tensor(make_smem_ptr(at(c, kOffA)), LA{}));  // A (t, s)
      Tensor tUrV = thrU.partition_fragment_A(make_tensor(make_smem_ptr(at(c, kOffV)), LV{}));
      Tensor tUrD = thrU.partition_fragment_B(make_tensor(make_smem_ptr(at(c, kOffD)), LD{}));  // kd (channel, t)
      walk_chunk_mmas<kParts, C>(mmaO, mmaV, rS, rS, tUc, tOrS, tOrX, tVrV, tVrA, acc, sB0, sGam,
                                 [&] { gemm(mmaU, tUrV, tUrD, rS); });  // S^T += v^T kd
      // this warp is done with the stage: tell every CTA that will load into it again (after
      // __syncwarp, so that every lane's reads of the stage come before lane 0's arrival)
      __syncwarp();
      if (c + 2 < nchunks && (tid & 31) == 0)
        for (int r = 0; r < ncta; ++r) Barrier::arrive(&empty[s], uint32_t(r), 1u);

      // o: this warpgroup's columns into the tile of this chunk's parity, then row-wise 16-byte stores
      T* sO = reinterpret_cast<T*>(smem + kOffO) + s * C * LDO + wg * VW;
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) sO[get<1>(tOc(i)) * LDO + get<0>(tOc(i))] = T(acc(i));
      cutlass::arch::NamedBarrier::sync(128, 1 + wg);  // the warpgroup's tile is written (ids 1, 2: not __syncthreads' 0)
      T* oc = ob + int64_t(c) * C * HV;
      for (int i = wtid; i < Lr * (VW / 8); i += 128) {
        const int t = i / (VW / 8), cc = (i % (VW / 8)) * 8;
        *reinterpret_cast<uint4*>(oc + t * HV + cc) = *reinterpret_cast<const uint4*>(sO + t * LDO + cc);
      }
    }

    if (seg == last_seg) {
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV, true>(p, n, h, vt, len, rS, tUc);
      store_final_state<K, BV, true, kPool != chunk_fwd_cfg::kNoPool>(p, n, h, vt, rS, tUc);
    }
  }
};

template <class T, int K, int BV, bool kSave, int kPool>
__global__ void __launch_bounds__(chunk_fwd_cfg::kThreads, 1)
    chunk_walk_sm90_kernel(const FwdParams p, const chunk_fwd_cfg::Split sp, const __grid_constant__ WalkMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem[];
  WalkGmma<T, K, BV, kSave, kPool>::run(p, sp, maps, smem);
#else
  __trap();  // built for sm_90a only; run_chunk_walk_sm90 is called on sm_90 devices only
#endif
}

template <class T, int K, int BV, bool kSave, int kPool>
cudaError_t launch(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  const dim3 grid = walk_grid(p, sp, BV);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  // T = 0 still writes the final states (h0 or zero): no tensor to map, and no CTA loads
  WalkMaps maps{};
  const int64_t rows = int64_t(p.B) * p.T;
  if (rows > 0 &&
      (!encode_map(&maps.x, p.save_qx, rows, p.H, K) || !encode_map(&maps.d, p.save_kd, rows, p.H, K) ||
       !encode_map(&maps.a, p.save_a, rows, p.H, chunk_fwd_cfg::kChunk) || !encode_map(&maps.v, p.v, rows, p.H, p.V)))
    return cudaErrorInvalidValue;
  auto* kernel = &chunk_walk_sm90_kernel<T, K, BV, kSave, kPool>;
  constexpr int smem = WalkGmma<T, K, BV, kSave, kPool>::kSmem;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(chunk_fwd_cfg::kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;  // V tiles of one (sequence, head, segment)
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = grid.y < unsigned(kMaxCluster) ? grid.y : unsigned(kMaxCluster);
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  err = cudaLaunchKernelEx(&cfg, kernel, p, sp, maps);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <class T, int K>
cudaError_t dispatch_save(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return chunk_fwd_cfg::launch_walk_for(p, p.save_h != nullptr, [&](auto save, auto pool) {
    return launch<T, K, 128, decltype(save)::value, decltype(pool)::value>(p, sp, stream);
  });
}

template <class T>
cudaError_t dispatch_k(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  if (p.K == 256) return dispatch_save<T, 256>(p, sp, stream);
  if (p.K == 128) return dispatch_save<T, 128>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace chunk_walk_sm90_detail

cudaError_t run_chunk_walk_sm90(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  using namespace chunk_walk_sm90_detail;
  if (p.V % chunk_fwd_cfg::kWalkSm90BV != 0) return cudaErrorInvalidValue;
  if (p.dtype == DType::kBFloat16) return dispatch_k<cute::bfloat16_t>(p, sp, stream);
  if (p.dtype == DType::kFloat16) return dispatch_k<cute::half_t>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gla
