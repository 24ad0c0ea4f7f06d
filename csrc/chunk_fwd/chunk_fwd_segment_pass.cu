// Pass 1 of the segment split (chunk_fwd_config.h, Split): the end state of every segment but
// the last of each sequence, from a zero state, and the segment's total decay exp(sum g), into
// the workspace. It needs no q, no scores and no output: it only streams k, g and v, so it is
// built to be memory-bound rather than latency-bound. One CTA of 4 warps per (sequence, head,
// 32-channel slice of K, V tile of up to 128 columns, segment): its 32 x BV float32 state is
// 32 registers per thread, its smem ~67 KB (k, g, v double-buffered), so three CTAs share an
// SM; the V tile's v is read once per K slice, the slices of one (sequence, head) being
// neighbours in the grid so that the later reads come from L2. Per chunk (b = log2(e) * the
// in-chunk cumulative sum of g, G its last row, every exponent <= 0):
//   S = exp2(G) S + (k exp2(G - b))^T v
// The segments before the last are whole (seg_len is a multiple of the chunk): no row is masked.
#include <cute/tensor.hpp>

#include "chunk_fwd_config.h"
#include "cute_gemm.cuh"
#include "device_common.cuh"

namespace gla {
namespace segment_states_detail {

using namespace cute;

template <class T, class GT, int BV>
struct SegmentStates {
  static constexpr int KS = 32;                   // channels of K per CTA
  static constexpr int C = chunk_fwd_cfg::kChunk;  // 64 tokens per chunk
  static constexpr int NT = 128;
  static constexpr int PARTS = NT / KS, RPT = C / PARTS;  // cumsum: 4 threads per channel, 16 rows each
  static constexpr int LDK = KS + 8, LDV = BV + 8, LDKT = C + 8;  // padded rows (ldmatrix)
  // smem: two stages of {k [C][LDK], g [C][KS], v [C][LDV]}, then (k exp(G - b))^T [KS][LDKT],
  // the partial sums [PARTS][KS] and exp(G) [KS]
  static constexpr int kK = C * LDK * 2, kG = C * KS * int(sizeof(GT)), kV = C * LDV * 2;
  static constexpr int kStage = kK + kG + kV;
  static constexpr int kOffKT = 2 * kStage, kOffTot = kOffKT + KS * LDKT * 2, kOffGam = kOffTot + PARTS * KS * 4;
  static constexpr int kSmem = kOffGam + KS * 4;
  static constexpr int kMinBlocks = 3;
  static_assert(kStage % 16 == 0 && kK % 16 == 0 && kG % 16 == 0, "16-byte aligned buffers");
  static_assert(kMinBlocks * kSmem <= 227 * 1024, "three CTAs per SM");

  using Atom = MMA_Atom<typename MmaAtomFor<T>::type>;
  // 32 x BV state tile: 2 warps along K, 2 along V
  using Mma = decltype(make_tiled_mma(Atom{}, Layout<Shape<_2, _2, _1>>{}, Tile<_32, _32, _16>{}));

  static __device__ void run(const FwdParams& p, const chunk_fwd_cfg::Split& sp, unsigned char* smem) {
    T* sKT = reinterpret_cast<T*>(smem + kOffKT);
    float* sTot = reinterpret_cast<float*>(smem + kOffTot);
    float* sGam = reinterpret_cast<float*>(smem + kOffGam);
    auto sK = [&](int c) { return reinterpret_cast<T*>(smem + (c & 1) * kStage); };
    auto sG = [&](int c) { return reinterpret_cast<GT*>(smem + (c & 1) * kStage + kK); };
    auto sV = [&](int c) { return reinterpret_cast<T*>(smem + (c & 1) * kStage + kK + kG); };

    const int tid = threadIdx.x;
    const int slices = p.K / KS;
    const int nh = blockIdx.x / slices, ks = blockIdx.x % slices;
    const int n = nh / p.H, h = nh % p.H, vt = blockIdx.y, seg = blockIdx.z;
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    const int64_t len = eos > bos ? eos - bos : 0;
    // the last segment (and any past the end) needs no end state
    if (len == 0 || seg >= int((len - 1) / sp.seg_len)) return;
    bos += int64_t(seg) * sp.seg_len;
    const int nchunks = sp.seg_len / C;  // segments before the last are whole
    const int64_t HK = int64_t(p.H) * p.K, HV = int64_t(p.H) * p.V;
    const int64_t koff = bos * HK + int64_t(h) * p.K + ks * KS;
    const T* kb = static_cast<const T*>(p.k) + koff;
    const GT* gb = static_cast<const GT*>(p.g) + koff;
    const T* vb = static_cast<const T*>(p.v) + bos * HV + int64_t(h) * p.V + vt * BV;
    auto load = [&](int c) {
      const int64_t t0 = int64_t(c) * C;
      load_tile<NT, C, KS>(sK(c), LDK, kb + t0 * HK, HK, C, tid);
      load_tile<NT, C, KS>(sG(c), KS, gb + t0 * HK, HK, C, tid);
      load_tile<NT, C, BV>(sV(c), LDV, vb + t0 * HV, HV, C, tid);
      cp_async_commit();
    };

    Mma mma;
    Tensor rS = partition_fragment_C(mma, Shape<Int<KS>, Int<BV>>{});
    Tensor tc = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<KS>, Int<BV>>{}));
    clear(rS);
    const int ch = tid % KS, part = tid / KS;
    float log_decay = 0.f;  // sum of g over the segment, channel ch (log2 units)

    load(0);
    for (int c = 0; c < nchunks; ++c) {
      // stage (c + 1) & 1 was last read in chunk c - 1, which ended with a barrier
      if (c + 1 < nchunks) {
        load(c + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      // cumulative sum of g per channel: this thread's RPT rows, then the parts before it
      const T* k = sK(c);
      float gv[RPT];
      const float2 cs = chunk_cumsum<RPT, PARTS>(sG(c), KS, ch, part, C, sTot, KS, gv);
      const float off = cs.x, gam = cs.y;
      const float gam2 = gam * kLog2e;
      log_decay += gam2;
      if (part == 0) sGam[ch] = ex2(gam2);
      CUTE_UNROLL
      for (int r = 0; r < RPT; r += 2) {
        const int t = part * RPT + r;
        const float k0 = float(k[t * LDK + ch]) * ex2(gam2 - (gv[r] + off) * kLog2e);
        const float k1 = float(k[(t + 1) * LDK + ch]) * ex2(gam2 - (gv[r + 1] + off) * kLog2e);
        *reinterpret_cast<uint32_t*>(sKT + ch * LDKT + t) = pack2<T>(k0, k1);
      }
      __syncthreads();
      CUTE_UNROLL
      for (int i = 0; i < size(rS); ++i) rS(i) *= sGam[get<0>(tc(i))];
      Tensor sKTf = make_tensor(make_smem_ptr(sKT), make_layout(Shape<Int<KS>, Int<C>>{}, make_stride(Int<LDKT>{}, _1{})));
      Tensor sVt = make_tensor(make_smem_ptr(sV(c)), make_layout(Shape<Int<BV>, Int<C>>{}, make_stride(_1{}, Int<LDV>{})));
      gemm_smem<SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T, T>(mma, sKTf, sVt, rS, tid);
      __syncthreads();  // sKT, sGam and this stage free
    }

    const int64_t slot = int64_t(nh) * sp.nseg + seg;
    float* S = sp.ws_state + slot * p.K * p.V + int64_t(ks * KS) * p.V + vt * BV;
    CUTE_UNROLL
    for (int i = 0; i < size(rS); i += 2)
      *reinterpret_cast<float2*>(S + int64_t(get<0>(tc(i))) * p.V + get<1>(tc(i))) = make_float2(rS(i), rS(i + 1));
    if (vt == 0 && part == 0) sp.ws_decay[slot * p.K + ks * KS + ch] = ex2(log_decay);
  }
};

template <class T, class GT, int BV>
__global__ void __launch_bounds__(SegmentStates<T, GT, BV>::NT, SegmentStates<T, GT, BV>::kMinBlocks)
    segment_states_kernel(const FwdParams p, const chunk_fwd_cfg::Split sp) {
  extern __shared__ __align__(128) unsigned char smem[];
  SegmentStates<T, GT, BV>::run(p, sp, smem);
}

template <class T, class GT, int BV>
cudaError_t launch(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  using S = SegmentStates<T, GT, BV>;
  // x: (sequence, head) major, K slice minor (the slices sharing v run side by side)
  const dim3 grid(unsigned(p.N) * unsigned(p.H) * unsigned(p.K / S::KS), unsigned(p.V / BV), unsigned(sp.nseg - 1));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(&segment_states_kernel<T, GT, BV>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmem);
  if (err != cudaSuccess) return err;
  segment_states_kernel<T, GT, BV><<<grid, S::NT, S::kSmem, stream>>>(p, sp);
  return cudaGetLastError();
}

template <class T, class GT>
cudaError_t dispatch_v(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return p.V % 128 == 0 ? launch<T, GT, 128>(p, sp, stream) : launch<T, GT, 64>(p, sp, stream);
}

template <class T>
cudaError_t dispatch_g(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  return p.g_dtype == DType::kFloat32 ? dispatch_v<T, float>(p, sp, stream) : dispatch_v<T, T>(p, sp, stream);
}

}  // namespace segment_states_detail

cudaError_t run_segment_states(const FwdParams& p, const chunk_fwd_cfg::Split& sp, cudaStream_t stream) {
  using namespace segment_states_detail;
  if (sp.seg_len <= 0 || sp.seg_len % chunk_fwd_cfg::kChunk != 0 || sp.nseg < 2 || p.K % 32 != 0)
    return cudaErrorInvalidValue;
  if (p.dtype == DType::kBFloat16) return dispatch_g<cute::bfloat16_t>(p, sp, stream);
  if (p.dtype == DType::kFloat16) return dispatch_g<cute::half_t>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gla
