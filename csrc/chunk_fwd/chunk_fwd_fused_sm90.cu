// The fused chunked forward on Hopper (sm_90a) for K = 128 and V tiles of 128: warp-specialised.
// One CTA per (sequence, head, V tile of 128, segment), three warpgroups:
//   producers (warpgroups 0 and 1, 256 threads): per chunk, the prep of chunk_fwd_fused_sm90_prep.cuh (q, k,
//     g by cp.async; the cumulative gate b; the one-reference vote; the operands), written into a
//     stage of shared memory in wgmma's 128-byte-swizzled layouts with the chunk's per-channel
//     factors; one of them loads the chunk's v into the stage by TMA. Where the gates allow one
//     reference row r (nearly always), the operands are q~ = q exp2(b - b_r) and
//     k~ = k exp2(b_r - b) and the scores are left to the consumer; otherwise qx, kd and the
//     exact scores A;
//   consumer (warpgroup 2, 128 threads): A = scale tril(q~ k~^T) by wgmma where the producers left
//     it, then the walk of chunk_fwd_twostage_walk_sm90.cu with the state S^T (128 x 128, float32, 128
//     registers per thread) in the accumulator of the update's wgmma:
//       o^T = (f_out S)^T x^T + v^T A^T           (the state as wgmma's register operand)
//       S^T = (S^T f_pre + v^T y) f_post          (f_post on one-reference chunks only)
//     with x, y = q~, k~ and f = scale exp2(b_r), exp2(b_r), exp2(G - b_r), or x, y = qx, kd and
//     f = exp2(b_0), exp2(G); in two halves of 64 rows of V, then o through shared memory to
//     16-byte row stores.
// Training (kSave) also keeps the backward's intermediates (FwdParams::save_*, intermediates.h): the
// producers write qx, kd (from the same products as q~, k~), the decays, the flags and the exact
// scores, the consumer the one-reference scores (from its stage) and the state entering every
// chunk (V tile 0 the per-token ones, every V tile its columns of the states).
// The consumer computes the one-reference scores itself, which balances the work of the two
// sides (docs/kernels/chunk_fwd.md). Two stages: the
// producers fill one while the consumer reads the other; a stage's "full" mbarrier completes
// when the 256 producer threads have written it (and fenced their writes for the async proxy)
// and its v landed, its "empty" one when the consumer's 4 warps are done with it. The producers
// give registers to the consumer (setmaxnreg). Segment splitting as in the other walks (pass 1:
// chunk_fwd_segment_pass.cu).
#include "chunk_fwd_tma_sm90.h"  // first: cudaTypedefs.h before the CUTLASS headers

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "chunk_fwd_config.h"
#include "chunk_fwd_fused_sm90_prep.cuh"
#include "chunk_fwd_state.cuh"
#include "chunk_fwd_walk_gmma_sm90.cuh"
#include "device_common.cuh"

namespace gla {
namespace chunk_fused_sm90_detail {

using namespace cute;
using Barrier = cutlass::arch::ClusterTransactionBarrier;

template <class T, class GT, bool kSave, int kPool>
struct FusedGmma {
  static constexpr int K = 128, BV = chunk_fwd_cfg::kFusedSm90BV, C = chunk_fwd_cfg::kChunk;
  static constexpr int NP = chunk_fwd_cfg::kThreads, NT = chunk_fwd_cfg::kFusedSm90Threads;  // producers; all
  static constexpr int VH = 64, kParts = 4, KH = K / kParts;  // V rows per half of o's MMA; channels per part
  using Prod = GroupSync<1, NP>;
  using Cons = GroupSync<2, NT - NP>;
  using P = ChunkPrep<T, GT, K, Prod>;
  using LX = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<C>, Int<K>>{}));    // x: q~ or qx (C, K)
  using LA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<C>, Int<C>>{}));    // A (C, C)
  // y (k~ or kd) as (K, C) and v^T as (BV, C), MN-major, tiled along C first (v: each 64-column block is one TMA box)
  using LD = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<K>, Int<C>>{}, Step<_2, _1>{}));
  using LV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<BV>, Int<C>>{}, Step<_2, _1>{}));
  using LVH = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<VH>, Int<C>>{}));  // half of v^T
  // the same smem as LD, read as k~ (s, channel) K-major: the B operand of the scores (checked
  // element by element on the host: both map every (s, channel) to the same byte)
  using LK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<C>, Int<K>>{}));
  // a stage: qx or q~, kd or k~, A, v, then the per-channel factors [3][K] float and the one_ref flag
  static constexpr int kBox = C * 64 * 2;
  static constexpr int kOffD = C * K * 2, kOffA = kOffD + K * C * 2, kOffV = kOffA + C * C * 2,
                       kOffDec = kOffV + BV * C * 2, kStage = (kOffDec + 3 * K * 4 + 16 + 1023) / 1024 * 1024;
  static constexpr int kTxV = (BV / 64) * kBox;  // TMA bytes per stage
  // then the output tile [C][BV + 8] (16-bit), the producers' tiles, the barriers
  static constexpr int LDO = BV + 8;
  static constexpr int kOffO = 2 * kStage, kOffP = kOffO + C * LDO * 2, kOffBar = kOffP + P::kSmem,
                       kSmem = kOffBar + 64 + 1024;  // + alignment slack
  static_assert(kSmem == chunk_fwd_cfg::fused_sm90_smem_bytes(K, BV), "smem layout");
  static_assert(NT - NP == 128 && BV == 2 * VH, "one consumer warpgroup, two halves of V");

  // S^T update: BV x K, both halves (two M tiles of one warpgroup)
  using AtomU = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<K>, _16>, GMMA::Major::MN, GMMA::Major::MN>());
  using MmaU = decltype(make_tiled_mma(AtomU{}));
  // o^T, a half: the state from registers times x^T; v^T times A^T from smem
  using AtomO = decltype(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<C>, _16>, GMMA::Major::K, GMMA::Major::K>());
  using AtomV = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<C>, _16>, GMMA::Major::MN, GMMA::Major::K>());
  using MmaO = decltype(make_tiled_mma(AtomO{}));
  using MmaV = decltype(make_tiled_mma(AtomV{}));
  // the scores of a one_ref chunk: q~ k~^T, both from smem
  using AtomA = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<C>, _16>, GMMA::Major::K, GMMA::Major::K>());
  using MmaA = decltype(make_tiled_mma(AtomA{}));

  // A stage's per-channel factors (f_out, f_pre, f_post above) and its one_ref flag.
  struct Factors {
    float *out, *pre, *post;
    int* one_ref;
    __device__ Factors(unsigned char* stage)
        : out(reinterpret_cast<float*>(stage + kOffDec)), pre(out + K), post(out + 2 * K),
          one_ref(reinterpret_cast<int*>(out + 3 * K)) {}
  };

  struct Ctx {
    unsigned char* smem;
    uint64_t *full, *empty;  // [2] each
    int64_t bos, len, slot0;  // slot0: the kept intermediates' slot of this segment's first chunk
    int n, h, vt, seg, last_seg, nchunks;
    bool save_tok;  // kSave and V tile 0: keeps the per-token intermediates
    __device__ T* stage(int c, int off) const { return reinterpret_cast<T*>(smem + (c & 1) * kStage + off); }
    __device__ Factors factors(int c) const { return Factors(smem + (c & 1) * kStage); }
    __device__ int rows_in(int c) const { return int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C); }
  };

  // Warpgroups 0 and 1: the prep of every chunk into its stage, v by TMA (thread 0).
  static __device__ __forceinline__ void produce(const FwdParams& p, const CUtensorMap& vmap, const Ctx& x, int tid) {
    const typename P::Tiles st(x.smem + kOffP);
    const int64_t HK = int64_t(p.H) * K;
    T* const qxb = kSave ? static_cast<T*>(p.save_qx) + x.bos * HK + int64_t(x.h) * K : nullptr;
    T* const kdb = kSave ? static_cast<T*>(p.save_kd) + x.bos * HK + int64_t(x.h) * K : nullptr;
    const T* qb = static_cast<const T*>(p.q) + x.bos * HK + int64_t(x.h) * K;
    const T* kb = static_cast<const T*>(p.k) + x.bos * HK + int64_t(x.h) * K;
    const GT* gb = static_cast<const GT*>(p.g) + x.bos * HK + int64_t(x.h) * K;
    auto load = [&](int c) {
      const int64_t off = int64_t(c) * C * HK;
      P::load(st, qb + off, kb + off, gb + off, HK, x.rows_in(c), tid);
    };
    if (x.nchunks > 0) load(0);
    for (int c = 0; c < x.nchunks; ++c) {
      const int s = c & 1, Lr = x.rows_in(c);
      if (c + 1 < x.nchunks) {  // the next chunk into L2 (its cp.async is issued once the tiles are free)
        const int64_t off = int64_t(c + 1) * C * HK;
        const int rows = x.rows_in(c + 1);
        prefetch_rows<NP>(qb + off, rows, K * 2, HK * 2, tid);
        prefetch_rows<NP>(kb + off, rows, K * 2, HK * 2, tid);
        prefetch_rows<NP>(gb + off, rows, K * int(sizeof(GT)), HK * int(sizeof(GT)), tid);
      }
      if (tid == 0) {  // once the consumer is done with the stage: its v by TMA
        if (c >= 2) Barrier::wait(&x.empty[s], ((c >> 1) - 1) & 1);
        Barrier::arrive_and_expect_tx(&x.full[s], kTxV);
        const int32_t t0 = int32_t(x.bos + int64_t(c) * C);
        for (int b = 0; b < BV / 64; ++b)
          SM90_TMA_LOAD_3D::copy(&vmap, &x.full[s], uint64_t(TMA::CacheHintSm90::EVICT_FIRST), x.stage(c, kOffV + b * kBox),
                                 int32_t(x.vt * BV + b * 64), x.h, t0);
      }
      cp_async_wait<0>();
      Prod::sync();  // q, k, g landed; the stage is free (thread 0 waited for it)

      bool far = false;
      const bool one_ref = P::cumsum(st, Lr, tid, kSave ? &far : nullptr);
      const int64_t slot = x.slot0 + c;
      if (tid < K) {  // the factors, from b (log2 units) at rows 0, C / 2 and C - 1
        const Factors f = x.factors(c);
        const float b0 = st.b[tid], br = st.b[(C / 2) * P::LDB + tid], bg = st.b[(C - 1) * P::LDB + tid];
        f.out[tid] = one_ref ? p.scale * ex2(br) : ex2(b0);
        f.pre[tid] = ex2(one_ref ? br : bg);
        f.post[tid] = ex2(bg - br);
        if (tid == 0) *f.one_ref = one_ref;
        if (x.save_tok) {
          float* dec = p.save_decay + (slot * p.H + x.h) * 3 * K + tid;
          dec[0] = ex2(bg);
          dec[K] = ex2(bg - b0);
          dec[2 * K] = ex2(b0);
          if (tid == 0) p.save_flags[slot * p.H + x.h] = int8_t(far);
        }
      }
      Tensor sX = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(x.stage(c, 0)), LX{}));
      Tensor sD = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(x.stage(c, kOffD)), LD{}));
      // every row: y must be zero past the sequence (the stage holds an older chunk)
      auto sink = [&](int t, int cc, uint4 xv, uint4 yv) {
        *reinterpret_cast<uint4*>(raw_pointer_cast(&sX(t, cc))) = xv;
        *reinterpret_cast<uint4*>(raw_pointer_cast(&sD(cc, t))) = yv;
      };
      if constexpr (kSave) {
        const int64_t r0 = int64_t(c) * C * HK;
        P::operands(st, one_ref, p.scale, tid, sink, [&](int t, int cc, uint4 qx, uint4 kd) {
          if (x.save_tok && t < Lr) {
            *reinterpret_cast<uint4*>(qxb + r0 + t * HK + cc) = qx;
            *reinterpret_cast<uint4*>(kdb + r0 + t * HK + cc) = kd;
          }
        });
      } else {
        P::operands(st, one_ref, p.scale, tid, sink);
      }
      if (c + 1 < x.nchunks) load(c + 1);  // q, k, b are free
      if (!one_ref) {  // the exact scores (a one_ref chunk's are the consumer's)
        Tensor sA = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(x.stage(c, kOffA)), LA{}));
        T* ab = kSave ? kept_scores(p, x, c) : nullptr;
        P::scores_out(st, tid, [&](int t, int s0, uint4 a) {
          *reinterpret_cast<uint4*>(raw_pointer_cast(&sA(t, s0))) = a;
          if (x.save_tok && t < Lr) *reinterpret_cast<uint4*>(ab + int64_t(t) * p.H * C + s0) = a;
        });
      }
      fence_async_smem();  // the stage is read by wgmma
      Barrier::arrive(&x.full[s]);
    }
  }

  // Row 0 of chunk c's kept scores (row stride H * C).
  static __device__ T* kept_scores(const FwdParams& p, const Ctx& x, int c) {
    return static_cast<T*>(p.save_a) + ((x.bos + int64_t(c) * C) * p.H + x.h) * C;
  }

  // Warpgroup 2: the walk down the chunks with the state in registers.
  static __device__ __forceinline__ void consume(const FwdParams& p, const chunk_fwd_cfg::Split& sp, const Ctx& x,
                                                 int wtid) {
    const int64_t HV = int64_t(p.H) * p.V;
    T* ob = static_cast<T*>(p.o) + x.bos * HV + int64_t(x.h) * p.V + x.vt * BV;
    MmaU mmaU;
    auto thrU = mmaU.get_thread_slice(wtid);
    Tensor rS = partition_fragment_C(mmaU, Shape<Int<BV>, Int<K>>{});                // S^T: (frag, half, 1)
    Tensor tUc = thrU.partition_C(make_identity_tensor(Shape<Int<BV>, Int<K>>{}));  // (v, channel)
    load_initial_state<K, BV, true, kPool != chunk_fwd_cfg::kNoPool>(p, sp, x.n, x.h, x.vt, x.seg, rS, tUc);
    CheckpointCursor ckpt(p);

    MmaO mmaO;
    MmaV mmaV;
    auto thrO = mmaO.get_thread_slice(wtid);
    auto thrV = mmaV.get_thread_slice(wtid);
    // a part (K / kParts channels) of a half of the state as the A operand (chunk_fwd_walk_gmma_sm90.cuh)
    Tensor tOrS = make_tensor<T>(partition_shape_A(mmaO, Shape<Int<VH>, Int<KH>>{}));
    static_assert(size<1>(decltype(rS){}) == 2, "two halves (M tiles) of S^T");
    Tensor acc = partition_fragment_C(mmaO, Shape<Int<VH>, Int<C>>{});              // o^T of a half
    Tensor tOc = thrO.partition_C(make_identity_tensor(Shape<Int<VH>, Int<C>>{}));  // (v, t)
    MmaA mmaA;
    auto thrA = mmaA.get_thread_slice(wtid);
    Tensor accA = partition_fragment_C(mmaA, Shape<Int<C>, Int<C>>{});
    Tensor tAc = thrA.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));  // (t, s)
    T* sO = reinterpret_cast<T*>(x.smem + kOffO);

    for (int c = 0; c < x.nchunks; ++c) {
      const int s = c & 1, Lr = x.rows_in(c);
      const Factors f = x.factors(c);
      if constexpr (kSave)  // the state entering this chunk (16-bit stores: the pairs are adjacent rows)
        store_state<T, true>(static_cast<typename KeptState<T>::type*>(p.save_h) + ((x.slot0 + c) * p.H + x.h) * K * p.V +
                                 x.vt * BV,
                             p.V, rS, tUc);
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV, true>(p, x.n, x.h, x.vt, int64_t(c) * C, rS, tUc);
      Barrier::wait(&x.full[s], (c >> 1) & 1);
      const bool one_ref = *f.one_ref != 0;
      if (one_ref) {  // A = scale tril(q~ k~^T) into the stage
        Tensor tArQ = thrA.partition_fragment_A(make_tensor(make_smem_ptr(x.stage(c, 0)), LX{}));
        Tensor tArK = thrA.partition_fragment_B(make_tensor(make_smem_ptr(x.stage(c, kOffD)), LK{}));
        clear(accA);
        warpgroup_fence_operand(accA);
        warpgroup_arrive();
        gemm(mmaA, tArQ, tArK, accA);
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(accA);
        Tensor sA = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(x.stage(c, kOffA)), LA{}));
        CUTE_UNROLL
        for (int i = 0; i < size(accA); i += 2) {  // (i, i + 1): columns s0, s0 + 1
          const int t = get<0>(tAc(i)), s0 = get<1>(tAc(i));
          *reinterpret_cast<uint32_t*>(raw_pointer_cast(&sA(t, s0))) =
              pack2<T>(s0 <= t ? accA(i) * p.scale : 0.f, s0 + 1 <= t ? accA(i + 1) * p.scale : 0.f);
        }
        fence_async_smem();  // A is read by wgmma
        Cons::sync();
        if (x.save_tok) {  // the rows in the sequence, 16 bytes at a time
          T* ab = kept_scores(p, x, c);
          for (int i = wtid; i < Lr * (C / 8); i += NT - NP) {
            const int t = i / (C / 8), s0 = (i % (C / 8)) * 8;
            *reinterpret_cast<uint4*>(ab + int64_t(t) * p.H * C + s0) = *reinterpret_cast<const uint4*>(raw_pointer_cast(&sA(t, s0)));
          }
        }
      }
      Tensor tOrX = thrO.partition_fragment_B(make_tensor(make_smem_ptr(x.stage(c, 0)), LX{}));      // x (t, channel)
      Tensor tVrA = thrV.partition_fragment_B(make_tensor(make_smem_ptr(x.stage(c, kOffA)), LA{}));  // A (t, s)
      Tensor tUrV = thrU.partition_fragment_A(make_tensor(make_smem_ptr(x.stage(c, kOffV)), LV{}));  // v^T
      Tensor tUrD = thrU.partition_fragment_B(make_tensor(make_smem_ptr(x.stage(c, kOffD)), LD{}));  // y (channel, t)
      CUTE_UNROLL
      for (int m = 0; m < 2; ++m) {
        Tensor tVrV = thrV.partition_fragment_A(make_tensor(make_smem_ptr(x.stage(c, kOffV) + m * VH * C), LVH{}));
        walk_chunk_mmas<kParts, C>(mmaO, mmaV, rS(_, m, _), rS, tUc(_, m, _), tOrS, tOrX, tVrV, tVrA, acc, f.out, f.pre,
                                   [&] {
                                     if (m == 1) gemm(mmaU, tUrV, tUrD, rS);  // S^T += v^T y, both halves scaled by now
                                   });
        if (m == 0) Cons::sync();  // the previous chunk's rows of o are stored
        CUTE_UNROLL
        for (int i = 0; i < size(acc); ++i) sO[get<1>(tOc(i)) * LDO + m * VH + get<0>(tOc(i))] = T(acc(i));
      }
      if (one_ref) {  // S^T = (S^T exp2(b_r) + v^T k~) exp2(G - b_r)
        CUTE_UNROLL
        for (int i = 0; i < size(rS); i += 2) {
          const float2 e = *reinterpret_cast<const float2*>(f.post + get<1>(tUc(i)));
          rS(i) *= e.x;
          rS(i + 1) *= e.y;
        }
      }
      // this warp is done with the stage (every lane's reads of it before lane 0's arrival)
      __syncwarp();
      if (c + 2 < x.nchunks && (wtid & 31) == 0) Barrier::arrive(&x.empty[s]);
      Cons::sync();  // the tile is written
      T* oc = ob + int64_t(c) * C * HV;
      for (int i = wtid; i < Lr * (BV / 8); i += NT - NP) {
        const int t = i / (BV / 8), cc = (i % (BV / 8)) * 8;
        *reinterpret_cast<uint4*>(oc + t * HV + cc) = *reinterpret_cast<const uint4*>(sO + t * LDO + cc);
      }
    }

    if (x.seg == x.last_seg) {
      if constexpr (kPool == chunk_fwd_cfg::kPoolCheckpoints) ckpt.offer<K, BV, true>(p, x.n, x.h, x.vt, x.len, rS, tUc);
      store_final_state<K, BV, true, kPool != chunk_fwd_cfg::kNoPool>(p, x.n, x.h, x.vt, rS, tUc);
    }
  }

  // Every role is inlined into the kernel: a wgmma inside a called function is serialised
  // (ptxas warning C7510).
  static __device__ __forceinline__ void run(const FwdParams& p, const chunk_fwd_cfg::Split& sp,
                                             const CUtensorMap& vmap, unsigned char* smem_raw) {
    Ctx x;
    x.smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    x.full = reinterpret_cast<uint64_t*>(x.smem + kOffBar);
    x.empty = x.full + 2;
    const int tid = threadIdx.x;
    x.n = blockIdx.x / p.H;
    x.h = blockIdx.x % p.H;
    x.vt = blockIdx.y;
    x.seg = blockIdx.z;
    int64_t eos;
    sequence_bounds(p, x.n, x.bos, eos);
    x.len = eos > x.bos ? eos - x.bos : 0;
    x.last_seg = clip_to_segment(sp, x.seg, x.bos, x.len);
    if (x.last_seg < 0) return;
    if (kPool != chunk_fwd_cfg::kNoPool && padded_sequence(p, x.n)) {  // pooled call: zeros out, no slot touched
      zero_output<T, BV>(p, x.h, x.vt, x.bos, x.len);
      return;
    }
    x.nchunks = int((x.len + C - 1) / C);
    x.slot0 = kSave ? p.chunk_off[x.n] + (sp.seg_len > 0 ? int64_t(x.seg) * (sp.seg_len / C) : 0) : 0;
    x.save_tok = kSave && x.vt == 0;
    if (tid == 0) {
      for (int s = 0; s < 2; ++s) {
        Barrier::init(&x.full[s], NP + 1);    // the producers' arrivals and the TMA's
        Barrier::init(&x.empty[s], (NT - NP) / 32);  // the consumer's warps
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();
    if (tid < NP) {
      cutlass::arch::warpgroup_reg_dealloc<chunk_fwd_cfg::kFusedSm90ProducerRegs>();
      produce(p, vmap, x, tid);
    } else {
      cutlass::arch::warpgroup_reg_alloc<chunk_fwd_cfg::kFusedSm90ConsumerRegs>();
      consume(p, sp, x, tid - NP);
    }
  }
};

template <class T, class GT, bool kSave, int kPool>
__global__ void __launch_bounds__(chunk_fwd_cfg::kFusedSm90Threads, 1)
    chunk_fused_sm90_kernel(const FwdParams p, const chunk_fwd_cfg::Split sp, const __grid_constant__ CUtensorMap vmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem[];
  FusedGmma<T, GT, kSave, kPool>::run(p, sp, vmap, smem);
#else
  __trap();  // built for sm_90a only; run_chunk_fused_sm90 is called on sm_90 devices only
#endif
}

template <class T, class GT, bool kSave, int kPool>
cudaError_t launch(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  const dim3 grid = walk_grid(p, sp, chunk_fwd_cfg::kFusedSm90BV);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  CUtensorMap vmap{};  // T = 0 still writes the final states: no tensor to map, and no CTA loads
  if (p.T > 0 && !encode_map(&vmap, p.v, int64_t(p.B) * p.T, p.H, p.V)) return cudaErrorInvalidValue;
  auto* kernel = &chunk_fused_sm90_kernel<T, GT, kSave, kPool>;
  constexpr int smem = FusedGmma<T, GT, kSave, kPool>::kSmem;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, chunk_fwd_cfg::kFusedSm90Threads, smem, stream>>>(p, sp, vmap);
  return cudaGetLastError();
}

template <class T, class GT>
cudaError_t dispatch_save(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return chunk_fwd_cfg::launch_walk_for(p, p.save_a != nullptr, [&](auto save, auto pool) {
    return launch<T, GT, decltype(save)::value, decltype(pool)::value>(p, sp, stream);
  });
}

template <class T>
cudaError_t dispatch_g(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return p.g_dtype == DType::kFloat32 ? dispatch_save<T, float>(p, sp, stream) : dispatch_save<T, T>(p, sp, stream);
}

}  // namespace chunk_fused_sm90_detail

cudaError_t run_chunk_fused_sm90(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  using namespace chunk_fused_sm90_detail;
  if (p.K != 128 || p.V % chunk_fwd_cfg::kFusedSm90BV != 0) return cudaErrorInvalidValue;
  if (p.dtype == DType::kBFloat16) return dispatch_g<cute::bfloat16_t>(p, sp, stream);
  if (p.dtype == DType::kFloat16) return dispatch_g<cute::half_t>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gla
