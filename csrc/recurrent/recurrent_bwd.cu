// Recurrent GLA backward, for sequences of at most kRecurrentBwdMaxT tokens.
//
// With dS_t the gradient of the loss w.r.t. S_t (dS_{T-1} = dht + scale q^T do, and
// dS_{t-1} = diag(a_t) dS_t + scale q_{t-1}^T do_{t-1}, a_t = exp g_t):
//   dq_t = scale * do_t S_t^T      dk_t = dS_t v_t     dv_t = k_t dS_t
//   dg_t = a_t * rowsum(dS_t (.) S_{t-1})            dh0 = diag(a_0) dS_0
// dg is computed in this exact form (no reverse cumulative sum of q dq - k dk, which cancels
// catastrophically in float32 when the gates are strongly negative). S_{t-1} is recomputed
// from h0 for every t, O(T^2) state steps, which is why T is bounded. All T tokens' inputs
// sit in shared memory as float. dq, dk and dg are summed over the CTA's V tile only: they
// are written as float32 partials per V tile and summed by the caller, deterministically.
#include "recurrent.h"
#include "recurrent_tile.cuh"

namespace gla {
namespace recurrent {
namespace {

template <int KMAX, int NT>
struct BwdSmem {
  using Tl = Tile<KMAX, NT, false>;  // the backward's states are [K, V]
  static constexpr int kLdK = KMAX + 1;  // padded: the (vq, k) writes are free of conflicts
  int Tm;                                // tokens held
  __host__ __device__ int floats() const {
    return Tm * (3 * KMAX + 2 * kBV) + 2 * Tl::CQ * kLdK + Tl::KG * (kBV + 4);
  }
};

template <int KMAX, int NT>
__global__ void __launch_bounds__(NT) bwd_kernel(const RecurrentParams p, int Tm) {
  using Tl = Tile<KMAX, NT, false>;  // the backward's states are [K, V]
  constexpr int R = Tl::R, CQ = Tl::CQ, KG = Tl::KG, LDK = BwdSmem<KMAX, NT>::kLdK;
  extern __shared__ __align__(16) float smem[];
  float* sq = smem;                  // [Tm][KMAX]  q * scale
  float* sk = sq + Tm * KMAX;        // [Tm][KMAX]
  float* sa = sk + Tm * KMAX;        // [Tm][KMAX]  exp(g)
  float* sv = sa + Tm * KMAX;        // [Tm][kBV]
  float* sdo = sv + Tm * kBV;        // [Tm][kBV]
  float* red_k0 = sdo + Tm * kBV;    // [CQ][LDK]   sums over v: dq, then dk
  float* red_k1 = red_k0 + CQ * LDK; // [CQ][LDK]   dg
  float* red_v = red_k1 + CQ * LDK;  // [KG][kBV+4] sums over k: dv

  const int n = blockIdx.x, h = blockIdx.y, vt = blockIdx.z, v0 = vt * kBV, tid = threadIdx.x;
  const Tl tl(tid);
  const Seq s = locate(p, n, h);
  const int64_t rows = int64_t(p.B) * p.T * p.H;  // token rows of [B*T, H, .]
  const int K = p.K, V = p.V;

  for (int t = 0; t < s.len; ++t) {
    const int64_t row = (s.bos + t) * p.H + h;
    for (int i = tid; i < KMAX; i += NT) {
      const bool in = i < K;
      sq[t * KMAX + i] = in ? p.scale * load_as_float(p.q, row * K + i, p.dtype) : 0.f;
      sk[t * KMAX + i] = in ? load_as_float(p.k, row * K + i, p.dtype) : 0.f;
      sa[t * KMAX + i] = in ? expf(load_as_float(p.g, row * K + i, p.g_dtype)) : 0.f;
    }
    if (tid < kBV) {
      const bool in = v0 + tid < V;
      sv[t * kBV + tid] = in ? load_as_float(p.v, row * V + v0 + tid, p.dtype) : 0.f;
      sdo[t * kBV + tid] = in ? load_as_float(p.dout, row * V + v0 + tid, p.dtype) : 0.f;
    }
  }
  __syncthreads();

  // Sums this thread's per-row values over the CTA's columns (in vq order) into out[row].
  auto sum_over_v = [&](const float* red, float* out, int64_t row, float mul) {
    if (tid < K) {
      float x = 0.f;
      for (int q = 0; q < CQ; ++q) x += red[q * LDK + tid];
      out[(vt * rows + row) * K + tid] = mul * x;
    }
  };

  float S0[R][4], S[R][4], dS[R][4];
  load_state(S0, s.s_in, tl, p, v0);

  // Forward sweep: dq_t = scale * do_t S_t^T (partial over this V tile).
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) S[i][j] = S0[i][j];
  for (int t = 0; t < s.len; ++t) {
    step(S, tl, sa + t * KMAX, sk + t * KMAX, sv + t * kBV);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float x = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) x = fmaf(sdo[t * kBV + tl.v(j)], S[i][j], x);
      red_k0[tl.vq * LDK + tl.k(i)] = x;
    }
    __syncthreads();
    sum_over_v(red_k0, p.dq_part, (s.bos + t) * p.H + h, p.scale);
    __syncthreads();
  }

  // Reverse sweep.
  load_state(dS, p.dht != nullptr ? p.dht + (int64_t(n) * p.H + h) * K * V : nullptr,
                       tl, p, v0);
  for (int t = s.len - 1; t >= 0; --t) {
    const float* q = sq + t * KMAX;
    const float* k = sk + t * KMAX;
    const float* a = sa + t * KMAX;
    const float* v = sv + t * kBV;
    const float* d_o = sdo + t * kBV;
    float pv[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float x = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dS[i][j] = fmaf(q[tl.k(i)], d_o[tl.v(j)], dS[i][j]);  // q holds scale
        pv[j] = fmaf(k[tl.k(i)], dS[i][j], pv[j]);
        x = fmaf(dS[i][j], v[tl.v(j)], x);
      }
      red_k0[tl.vq * LDK + tl.k(i)] = x;  // dk
    }
    *reinterpret_cast<float4*>(&red_v[tl.kg * (kBV + 4) + tl.v(0)]) =
        make_float4(pv[0], pv[1], pv[2], pv[3]);

    // S_{t-1}, recomputed from h0
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[i][j] = S0[i][j];
    for (int u = 0; u < t; ++u) step(S, tl, sa + u * KMAX, sk + u * KMAX, sv + u * kBV);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float x = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) x = fmaf(dS[i][j], S[i][j], x);
      red_k1[tl.vq * LDK + tl.k(i)] = a[tl.k(i)] * x;  // dg
    }
    __syncthreads();
    const int64_t row = (s.bos + t) * p.H + h;
    sum_over_v(red_k0, p.dk_part, row, 1.f);
    sum_over_v(red_k1, p.dg_part, row, 1.f);
    if (tid < kBV && v0 + tid < V) {
      float x = 0.f;
      for (int g = 0; g < KG; ++g) x += red_v[g * (kBV + 4) + tid];
      store_from_float(p.dv, row * V + v0 + tid, x, p.dtype);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dS[i][j] *= a[tl.k(i)];
  }
  if (p.dh0 != nullptr) store_state(dS, p.dh0 + (int64_t(n) * p.H + h) * K * V, tl, p, v0);
}

template <int KMAX, int NT>
cudaError_t launch(const RecurrentParams& p, cudaStream_t stream) {
  const int Tm = p.T < 1 ? 1 : p.T;
  const size_t bytes = size_t(BwdSmem<KMAX, NT>{Tm}.floats()) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(bwd_kernel<KMAX, NT>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(p.N, p.H, (p.V + kBV - 1) / kBV);
  bwd_kernel<KMAX, NT><<<grid, NT, bytes, stream>>>(p, Tm);
  return cudaGetLastError();
}

}  // namespace
}  // namespace recurrent

cudaError_t recurrent_bwd(const RecurrentParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  if (p.T > kRecurrentBwdMaxT) return cudaErrorInvalidValue;
  if (p.K <= 64) return recurrent::launch<64, 256>(p, stream);
  if (p.K <= 128) return recurrent::launch<128, 256>(p, stream);
  return recurrent::launch<256, 512>(p, stream);  // 8 rows per thread, as for smaller K
}

}  // namespace gla
