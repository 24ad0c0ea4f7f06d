// Stage 1 of the two-stage forward (chunk_fwd_config.h, two_stage): one CTA per (chunk slot,
// head), in parallel over every chunk of the batch, computes what the walk (chunk_fwd_twostage_walk_sm80.cu)
// and the Triton backward read (FwdParams::save_*). With b = log2(e) * the in-chunk cumulative
// sum of g, b_0 its first row and G its last:
//   save_qx     scale q exp2(b - b_0)
//   save_kd     k exp2(G - b)
//   save_decay  exp2(G), exp2(G - b_0), exp2(b_0)   (float32, per channel)
//   save_a      scale * tril(q k^T gated), zeros above the diagonal (chunk_fwd_scores.cuh: one
//               reference row where the gates allow, the exact path otherwise)
//   save_flags  (where set) 1 if some |b_t - b_32| > 40 nats: the Triton backward's exact path
// Rows past the end of a sequence are zero-filled on load and never written. Where the chunk
// takes the one-reference scores, qx and kd come from the scores' gated operands (one pass,
// two exponentials per element, per-channel factors for the rest).
#include <cute/tensor.hpp>

#include "chunk_fwd_config.h"
#include "chunk_fwd_scores.cuh"
#include "device_common.cuh"

namespace gla {
namespace chunk_prep_detail {

// Eight floats of smem (32-byte aligned) into registers.
__device__ __forceinline__ void load8(const float* src, float* dst) {
  const float4 a = *reinterpret_cast<const float4*>(src), b = *reinterpret_cast<const float4*>(src + 4);
  dst[0] = a.x; dst[1] = a.y; dst[2] = a.z; dst[3] = a.w;
  dst[4] = b.x; dst[5] = b.y; dst[6] = b.z; dst[7] = b.w;
}

template <class T, class GT, int K>
struct Prep {
  static constexpr int C = chunk_fwd_cfg::kChunk, NT = chunk_fwd_cfg::kThreads;
  static constexpr int LDQ = K + 8, LDB = K + 8, LDA = C + 8;
  static constexpr int TPC = NT / K, RPT = C / TPC;  // cumsum: threads per channel, rows each
  // smem: q, k [C][LDQ], b [C][LDB] float (raw g staged there first), A [C][LDA], partial sums
  static constexpr int kOffK = C * LDQ * 2, kOffB = 2 * kOffK, kOffA = kOffB + C * LDB * 4,
                       kOffTot = kOffA + C * LDA * 2, kSmem = kOffTot + NT * 4;
  static_assert(kSmem == chunk_fwd_cfg::prep_smem_bytes(K), "smem layout");
  static_assert(NT % K == 0 && RPT % 2 == 0, "K in {64, 128, 256}");
  using Scores = ChunkScores<T, K, LDQ, LDB, LDA>;

  static __device__ void run(const FwdParams& p, unsigned char* smem) {
    T* sQ = reinterpret_cast<T*>(smem);
    T* sK = reinterpret_cast<T*>(smem + kOffK);
    float* sB = reinterpret_cast<float*>(smem + kOffB);
    GT* sG = reinterpret_cast<GT*>(smem + kOffB);
    T* sA = reinterpret_cast<T*>(smem + kOffA);
    float* sTot = reinterpret_cast<float*>(smem + kOffTot);
    const int tid = threadIdx.x, h = blockIdx.y;
    const int64_t slot = blockIdx.x;
    // the sequence of this slot: the last n with slot_base(n) <= slot
    int n;
    if (p.cu_seqlens == nullptr) {
      n = int(slot / ((p.T + C - 1) / C));
    } else {
      int lo = 0, hi = p.N - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (chunk_fwd_cfg::slot_base(p, mid) <= slot) lo = mid;
        else hi = mid - 1;
      }
      n = lo;
    }
    int64_t bos, eos;
    sequence_bounds(p, n, bos, eos);
    const int64_t c = slot - chunk_fwd_cfg::slot_base(p, n);
    if (c * C >= eos - bos) return;  // a spare slot
    const int Lr = int(eos - bos - c * C < C ? eos - bos - c * C : C);
    const int64_t t0 = bos + c * C, HK = int64_t(p.H) * K;
    const int64_t off = t0 * HK + int64_t(h) * K;
    load_tile<NT, C, K>(sQ, LDQ, static_cast<const T*>(p.q) + off, HK, Lr, tid);
    load_tile<NT, C, K>(sK, LDQ, static_cast<const T*>(p.k) + off, HK, Lr, tid);
    load_tile<NT, C, K>(sG, K, static_cast<const GT*>(p.g) + off, HK, Lr, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // b per channel (this thread: channel ch, rows part * RPT ..), the decays
    float bmax = -INFINITY, bmin = INFINITY;
    {
      const int ch = tid % K, part = tid / K;
      const float bz = float(sG[ch]) * kLog2e;
      float gv[RPT];
      const float2 cs = chunk_cumsum<RPT, TPC>(sG, K, ch, part, Lr, sTot, K, gv);  // then b may overwrite g
      const float gam2 = cs.y * kLog2e;
      CUTE_UNROLL
      for (int r = 0; r < RPT; ++r) {
        const float b = (gv[r] + cs.x) * kLog2e;
        sB[(part * RPT + r) * LDB + ch] = b;
        bmax = fmaxf(bmax, b);
        bmin = fminf(bmin, b);
      }
      if (part == 0) {
        float* dec = p.save_decay + (slot * p.H + h) * 3 * K + ch;
        dec[0] = ex2(gam2);
        dec[K] = ex2(gam2 - bz);
        dec[2 * K] = ex2(bz);
      }
    }
    __syncthreads();

    // the scores' path (the vote is a barrier); then the gated operands, 8 channels (16 bytes)
    // per thread and row: a thread keeps channels cc .. cc + 7 (NT a multiple of K / 8)
    const bool one_ref = Scores::one_ref_ok(sB, bmax, bmin, tid);
    if (p.save_flags != nullptr) {
      const bool far = Scores::kSpan2 == Scores::kFlagSpan2 ? !one_ref
                                                            : !Scores::one_ref_ok(sB, bmax, bmin, tid, Scores::kFlagSpan2);
      if (tid == 0) p.save_flags[slot * p.H + h] = int8_t(far);
    }
    static_assert(NT % (K / 8) == 0, "fixed channels per thread");
    T* qx = static_cast<T*>(p.save_qx) + off;
    T* kd = static_cast<T*>(p.save_kd) + off;
    const int cc = (tid % (K / 8)) * 8;
    float b0[8], bg[8], br[8];  // rows 0, C - 1 (G: rows past the end add nothing) and C / 2 of b
    load8(sB + cc, b0);
    load8(sB + (C - 1) * LDB + cc, bg);
    load8(sB + (C / 2) * LDB + cc, br);
    // body(t, q, k, b) for this thread's pieces of the first `rows` rows
    auto for_pieces = [&](int rows, auto&& body) {
      for (int i = tid; i < rows * (K / 8); i += NT) {
        const int t = i / (K / 8);
        const uint4 qa = *reinterpret_cast<const uint4*>(sQ + t * LDQ + cc);
        const uint4 ka = *reinterpret_cast<const uint4*>(sK + t * LDQ + cc);
        float b[8];
        load8(sB + t * LDB + cc, b);
        body(t, reinterpret_cast<const T*>(&qa), reinterpret_cast<const T*>(&ka), b);
      }
    };
    if (one_ref) {
      // q~ = q exp2(b - b_r) and k~ = k exp2(b_r - b) over q and k for the scores' MMA;
      // qx = scale q~ exp2(b_r - b_0) and kd = k~ exp2(G - b_r) from the same products
      float fq[8], fk[8];
      CUTE_UNROLL
      for (int e = 0; e < 8; ++e) {
        fq[e] = p.scale * ex2(br[e] - b0[e]);
        fk[e] = ex2(bg[e] - br[e]);
      }
      for_pieces(C, [&](int t, const T* qe, const T* ke, const float* b) {
        uint4 qt, kt, xo, yo;
        T *qte = reinterpret_cast<T*>(&qt), *kte = reinterpret_cast<T*>(&kt);
        T *xe = reinterpret_cast<T*>(&xo), *ye = reinterpret_cast<T*>(&yo);
        CUTE_UNROLL
        for (int e = 0; e < 8; ++e) {
          const float x = float(qe[e]) * ex2(b[e] - br[e]), y = float(ke[e]) * ex2(br[e] - b[e]);
          qte[e] = T(x);
          kte[e] = T(y);
          xe[e] = T(x * fq[e]);
          ye[e] = T(y * fk[e]);
        }
        *reinterpret_cast<uint4*>(sQ + t * LDQ + cc) = qt;
        *reinterpret_cast<uint4*>(sK + t * LDQ + cc) = kt;
        if (t < Lr) {
          *reinterpret_cast<uint4*>(qx + t * HK + cc) = xo;
          *reinterpret_cast<uint4*>(kd + t * HK + cc) = yo;
        }
      });
      __syncthreads();
      Scores::one_ref_mma(sQ, sK, sA, p.scale, tid);
    } else {
      for_pieces(Lr, [&](int t, const T* qe, const T* ke, const float* b) {
        uint4 xo, yo;
        T *xe = reinterpret_cast<T*>(&xo), *ye = reinterpret_cast<T*>(&yo);
        CUTE_UNROLL
        for (int e = 0; e < 8; ++e) {
          xe[e] = T(p.scale * float(qe[e]) * ex2(fminf(b[e] - b0[e], 0.f)));
          ye[e] = T(float(ke[e]) * ex2(bg[e] - b[e]));
        }
        *reinterpret_cast<uint4*>(qx + t * HK + cc) = xo;
        *reinterpret_cast<uint4*>(kd + t * HK + cc) = yo;
      });
      Scores::template exact<false>(sQ, sK, sB, nullptr, sA, p.scale, tid);
    }
    __syncthreads();
    T* ab = static_cast<T*>(p.save_a) + (t0 * p.H + h) * C;
    for (int i = tid; i < Lr * (C / 8); i += NT) {
      const int t = i / (C / 8), s0 = (i % (C / 8)) * 8;
      const uint4 x = s0 / 16 > t / 16 ? make_uint4(0u, 0u, 0u, 0u) : *reinterpret_cast<const uint4*>(sA + t * LDA + s0);
      *reinterpret_cast<uint4*>(ab + int64_t(t) * p.H * C + s0) = x;
    }
  }
};

template <class T, class GT, int K>
__global__ void __launch_bounds__(chunk_fwd_cfg::kThreads, 1) chunk_prep_kernel(const FwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Prep<T, GT, K>::run(p, smem);
}

template <class T, class GT, int K>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  constexpr int smem = Prep<T, GT, K>::kSmem;
  const dim3 grid(unsigned(chunk_fwd_cfg::num_slots(p)), unsigned(p.H));
  if (grid.x == 0 || grid.y == 0 || p.N == 0) return cudaSuccess;
  auto* kernel = &chunk_prep_kernel<T, GT, K>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, chunk_fwd_cfg::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int K>
cudaError_t dispatch_g(const FwdParams& p, cudaStream_t stream) {
  return p.g_dtype == DType::kFloat32 ? launch<T, float, K>(p, stream) : launch<T, T, K>(p, stream);
}

template <class T>
cudaError_t dispatch_k(const FwdParams& p, cudaStream_t stream) {
  if (p.K == 256) return dispatch_g<T, 256>(p, stream);
  if (p.K == 128) return dispatch_g<T, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace chunk_prep_detail

cudaError_t run_chunk_prep(const FwdParams& p, cudaStream_t stream) {
  using namespace chunk_prep_detail;
  if (p.dtype == DType::kBFloat16) return dispatch_k<cute::bfloat16_t>(p, stream);
  if (p.dtype == DType::kFloat16) return dispatch_k<cute::half_t>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gla
