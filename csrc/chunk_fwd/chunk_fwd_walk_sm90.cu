// Stage 2 of the two-stage forward on Hopper (sm_90a): the walk of chunk_fwd_walk.cu with
// warpgroup MMAs (wgmma) reading their operands straight from shared memory, so that no warp
// spends instructions on ldmatrix and the tensor cores run asynchronously. Two warpgroups:
//   o (C x BV)  = qx (exp2(b_0) S) + A v   each warpgroup BV / 2 columns
//   S (K x BV)  = exp2(G) S + kd^T v       each warpgroup K / 2 rows (64 floats per thread)
// Every operand sits in smem in a wgmma layout with the 128-byte swizzle: qx and A K-major;
// kd (as kd^T), v and the S copy MN-major, i.e. in their row-major global layouts. The loads
// are cp.async (16-byte pieces, rows past the end zero-filled), double-buffered; the stores
// into smem that wgmma reads are followed by fence.proxy.async before the barrier.
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>

#include "chunk_fwd_config.h"
#include "chunk_fwd_state.cuh"
#include "device_common.cuh"

namespace gla {
namespace chunk_walk_sm90_detail {

using namespace cute;

__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <class T, int K, int BV, bool kSave>
struct WalkGmma {
  static constexpr int C = chunk_fwd_cfg::kChunk, NT = chunk_fwd_cfg::kThreads;
  using LX = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<C>, Int<K>>{}));    // qx (C, K)
  using LA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<C>, Int<C>>{}));    // A (C, C)
  using LD = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<K>, Int<C>>{}));   // kd^T (K, C)
  using LV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<BV>, Int<C>>{}));  // v^T (BV, C)
  using LS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<BV>, Int<K>>{}));  // S^T (BV, K)
  // per stage: qx, kd, v, A, then exp2(G), exp2(b_0) [K] float; then S. 1024-byte aligned pieces.
  static constexpr int kOffD = C * K * 2, kOffV = kOffD + K * C * 2, kOffA = kOffV + BV * C * 2,
                       kOffDec = kOffA + C * C * 2, kStage = (kOffDec + 2 * K * 4 + 1023) / 1024 * 1024;
  static constexpr int kOffS = 2 * kStage, kSmem = kOffS + BV * K * 2 + 1024;  // + alignment slack
  static_assert(kSmem == chunk_fwd_cfg::walk_sm90_smem_bytes(K, BV), "smem layout");
  static_assert(BV % 64 == 0 && K % 128 == 0, "BV multiple of 64, K of 128");

  using AtomO = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<BV / 2>, _16>, GMMA::Major::K, GMMA::Major::MN>());
  using AtomU = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<BV>, _16>, GMMA::Major::MN, GMMA::Major::MN>());
  using MmaO = decltype(make_tiled_mma(AtomO{}, Layout<Shape<_1, _2, _1>>{}));  // 64 x BV
  using MmaU = decltype(make_tiled_mma(AtomU{}, Layout<Shape<_2, _1, _1>>{}));  // 128 x BV, K / 128 times

  static __device__ void run(const FwdParams& p, const chunk_fwd_cfg::Split& sp, unsigned char* smem_raw) {
    unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    auto at = [&](int c, int off) { return reinterpret_cast<T*>(smem + (c & 1) * kStage + off); };
    T* sSp = reinterpret_cast<T*>(smem + kOffS);
    const int tid = threadIdx.x;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H, vt = blockIdx.y, seg = blockIdx.z;
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    int64_t len = eos > bos ? eos - bos : 0;
    const int last_seg = clip_to_segment(sp, seg, bos, len);
    if (last_seg < 0) return;
    const int64_t nh = int64_t(n) * p.H + h;
    const int nchunks = int((len + C - 1) / C);
    const int64_t slot0 = chunk_fwd_cfg::slot_base(p, n) + (sp.seg_len > 0 ? int64_t(seg) * (sp.seg_len / C) : 0);
    const int64_t HK = int64_t(p.H) * K, HV = int64_t(p.H) * p.V, HC = int64_t(p.H) * C;
    const T* xb = static_cast<const T*>(p.save_qx) + bos * HK + int64_t(h) * K;
    const T* db = static_cast<const T*>(p.save_kd) + bos * HK + int64_t(h) * K;
    const T* ab = static_cast<const T*>(p.save_a) + bos * HC + int64_t(h) * C;
    const T* vb = static_cast<const T*>(p.v) + bos * HV + int64_t(h) * p.V + vt * BV;
    T* ob = static_cast<T*>(p.o) + bos * HV + int64_t(h) * p.V + vt * BV;
    auto rows_in = [&](int c) { return int(len - int64_t(c) * C < C ? len - int64_t(c) * C : C); };

    // the (row, 8 columns) pieces of a row-major global tile into a swizzled smem tile; addr
    // gives the smem address of piece (row, column)
    auto load_rows = [&](auto&& addr, const T* g, int64_t gstride, int width, int rows) {
      const int pr = width / 8;
      for (int i = tid; i < C * pr; i += NT) {
        const int r = i / pr, cc = (i % pr) * 8;
        const bool ok = r < rows;
        cp_async16(addr(r, cc), g + (ok ? int64_t(r) * gstride + cc : 0), ok);
      }
    };
    auto load = [&](int c) {
      const int64_t t0 = int64_t(c) * C;
      const int Lr = rows_in(c);
      Tensor sX = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(at(c, 0)), LX{}));
      Tensor sD = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(at(c, kOffD)), LD{}));
      Tensor sV = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(at(c, kOffV)), LV{}));
      Tensor sA = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(at(c, kOffA)), LA{}));
      load_rows([&](int r, int cc) { return raw_pointer_cast(&sX(r, cc)); }, xb + t0 * HK, HK, K, Lr);
      load_rows([&](int r, int cc) { return raw_pointer_cast(&sD(cc, r)); }, db + t0 * HK, HK, K, Lr);
      load_rows([&](int r, int cc) { return raw_pointer_cast(&sV(cc, r)); }, vb + t0 * HV, HV, BV, Lr);
      load_rows([&](int r, int cc) { return raw_pointer_cast(&sA(r, cc)); }, ab + t0 * HC, HC, C, Lr);
      // exp2(G) and exp2(b_0): rows 0 and 2 of the slot's decays
      const float* dec = p.save_decay + ((slot0 + c) * p.H + h) * 3 * K;
      load_tile<NT, 2, K>(reinterpret_cast<float*>(smem + (c & 1) * kStage + kOffDec), K, dec, 2 * K, 2, tid);
      cp_async_commit();
    };

    MmaU mmaU;
    auto thrU = mmaU.get_thread_slice(tid);
    Tensor rS = partition_fragment_C(mmaU, Shape<Int<K>, Int<BV>>{});
    Tensor tUc = thrU.partition_C(make_identity_tensor(Shape<Int<K>, Int<BV>>{}));
    Tensor sSw = as_position_independent_swizzle_tensor(make_tensor(make_smem_ptr(sSp), LS{}));
    load_initial_state<K, BV>(p, sp, nh, vt, seg, rS, tUc);

    MmaO mmaO;
    auto thrO = mmaO.get_thread_slice(tid);
    Tensor tOrS = thrO.make_fragment_B(thrO.partition_B(make_tensor(make_smem_ptr(sSp), LS{})));

    if (nchunks > 0) load(0);
    for (int c = 0; c < nchunks; ++c) {
      const float* sGam = reinterpret_cast<const float*>(smem + (c & 1) * kStage + kOffDec);
      const float* sB0 = sGam + K;
      cp_async_wait<0>();
      fence_async_smem();
      __syncthreads();  // chunk c landed; chunk c - 1 (its stage, S) no longer read
      if (c + 1 < nchunks) load(c + 1);
      if constexpr (kSave)  // the state entering this chunk
        store_state<T>(static_cast<typename KeptState<T>::type*>(p.save_h) + ((slot0 + c) * p.H + h) * K * p.V + vt * BV,
                       p.V, rS, tUc);
      CUTE_UNROLL
      for (int i = 0; i < size(rS); i += 2) {
        const int kk = get<0>(tUc(i)), vv = get<1>(tUc(i));
        const float e = sB0[kk];
        *reinterpret_cast<uint32_t*>(raw_pointer_cast(&sSw(vv, kk))) = pack2<T>(rS(i) * e, rS(i + 1) * e);
      }
      fence_async_smem();
      __syncthreads();

      Tensor tOrX = thrO.make_fragment_A(thrO.partition_A(make_tensor(make_smem_ptr(at(c, 0)), LX{})));
      Tensor tOrA = thrO.make_fragment_A(thrO.partition_A(make_tensor(make_smem_ptr(at(c, kOffA)), LA{})));
      Tensor tOrV = thrO.make_fragment_B(thrO.partition_B(make_tensor(make_smem_ptr(at(c, kOffV)), LV{})));
      Tensor tUrD = thrU.make_fragment_A(thrU.partition_A(make_tensor(make_smem_ptr(at(c, kOffD)), LD{})));
      Tensor tUrV = thrU.make_fragment_B(thrU.partition_B(make_tensor(make_smem_ptr(at(c, kOffV)), LV{})));
      Tensor acc = partition_fragment_C(mmaO, Shape<Int<C>, Int<BV>>{});
      clear(acc);
      CUTE_UNROLL
      for (int i = 0; i < size(rS); ++i) rS(i) *= sGam[get<0>(tUc(i))];
      warpgroup_fence_operand(acc);
      warpgroup_fence_operand(rS);
      warpgroup_arrive();
      gemm(mmaO, tOrX, tOrS, acc);  // qx (exp2(b_0) S)
      gemm(mmaO, tOrA, tOrV, acc);  // + A v
      gemm(mmaU, tUrD, tUrV, rS);   // S = exp2(G) S + kd^T v
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      warpgroup_fence_operand(rS);

      store_output<T, C, BV>(ob + int64_t(c) * C * HV, HV, rows_in(c), thrO, acc);
    }

    if (p.ht != nullptr && seg == last_seg) store_state<T>(p.ht + nh * K * p.V + int64_t(vt) * BV, p.V, rS, tUc);
  }
};

template <class T, int K, int BV, bool kSave>
__global__ void __launch_bounds__(chunk_fwd_cfg::kThreads, 1)
    chunk_walk_sm90_kernel(const FwdParams p, const chunk_fwd_cfg::Split sp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem[];
  WalkGmma<T, K, BV, kSave>::run(p, sp, smem);
#else
  __trap();  // built for sm_90a only; run_chunk_walk_sm90 is called on sm_90 devices only
#endif
}

template <class T, int K, int BV, bool kSave>
cudaError_t launch(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return launch_walk(&chunk_walk_sm90_kernel<T, K, BV, kSave>, WalkGmma<T, K, BV, kSave>::kSmem, BV, p, sp, stream);
}

template <class T>
cudaError_t dispatch_save(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return p.save_h != nullptr ? launch<T, 256, 64, true>(p, sp, stream) : launch<T, 256, 64, false>(p, sp, stream);
}

}  // namespace chunk_walk_sm90_detail

cudaError_t run_chunk_walk_sm90(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  using namespace chunk_walk_sm90_detail;
  if (p.K != 256 || chunk_fwd_cfg::block_v(p.K, p.V) != 64) return cudaErrorInvalidValue;
  if (p.dtype == DType::kBFloat16) return dispatch_save<cute::bfloat16_t>(p, sp, stream);
  if (p.dtype == DType::kFloat16) return dispatch_save<cute::half_t>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gla
