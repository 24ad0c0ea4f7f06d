// Recurrent GLA forward: o_t = scale * q_t S_t, S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,
// the state tile in registers from the first token to the last (recurrent_tile.cuh).
#include "recurrent.h"
#include "recurrent_tile.cuh"

namespace gla {
namespace recurrent {
namespace {

// Four CTAs per SM where the state fits in 64 registers per thread: a decode step is one
// pass over the states, and more CTAs in flight cut the last wave's idle tail.
template <int KMAX, int NT, bool VF>
__global__ void __launch_bounds__(NT, KMAX <= 128 ? 4 : 2) fwd_kernel(const RecurrentParams p) {
  using Tl = Tile<KMAX, NT, VF>;
  __shared__ float sq[KMAX], sk[KMAX], sa[KMAX], sv[kBV];
  __shared__ __align__(16) float red[Tl::KG][kBV + 4];  // o partial sums, one row per k group

  const int n = blockIdx.x, h = blockIdx.y, v0 = blockIdx.z * kBV, tid = threadIdx.x;
  const Tl tl(tid);
  const Seq s = locate(p, n, h);
  if (s.skip) {  // pooled row without a state: zeros out, nothing read or written
    for (int t = 0; t < s.len; ++t)
      if (tid < kBV && v0 + tid < p.V)
        store_from_float(p.o, ((s.bos + t) * p.H + h) * p.V + v0 + tid, 0.f, p.dtype);
    return;
  }

  float S[Tl::R][4];
  load_state(S, s.s_in, tl, p, v0);

  for (int t = 0; t < s.len; ++t) {
    const int64_t row = (s.bos + t) * p.H + h;  // token row of [B*T, H, .]
    __syncthreads();  // the previous token's smem is consumed
    for (int i = tid; i < KMAX; i += NT) {
      const bool in = i < p.K;
      sq[i] = in ? p.scale * load_as_float(p.q, row * p.K + i, p.dtype) : 0.f;
      sk[i] = in ? load_as_float(p.k, row * p.K + i, p.dtype) : 0.f;
      sa[i] = in ? expf(load_as_float(p.g, row * p.K + i, p.g_dtype)) : 0.f;
    }
    if (tid < kBV)
      sv[tid] = v0 + tid < p.V ? load_as_float(p.v, row * p.V + v0 + tid, p.dtype) : 0.f;
    __syncthreads();

    step(S, tl, sa, sk, sv);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < Tl::R; ++i) {
      const float qi = sq[tl.k(i)];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] = fmaf(qi, S[i][j], acc[j]);
    }
    *reinterpret_cast<float4*>(&red[tl.kg][tl.v(0)]) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();
    if (tid < kBV && v0 + tid < p.V) {
      float o = 0.f;
#pragma unroll
      for (int g = 0; g < Tl::KG; ++g) o += red[g][tid];
      store_from_float(p.o, row * p.V + v0 + tid, o, p.dtype);
    }
  }
  store_state(S, s.s_out, tl, p, v0);
}

template <int KMAX>
cudaError_t launch(const RecurrentParams& p, cudaStream_t stream) {
  constexpr int NT = 256;
  const dim3 grid(p.N, p.H, (p.V + kBV - 1) / kBV);
  if (p.state_v_first)
    fwd_kernel<KMAX, NT, true><<<grid, NT, 0, stream>>>(p);
  else
    fwd_kernel<KMAX, NT, false><<<grid, NT, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace recurrent

cudaError_t recurrent_fwd(const RecurrentParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  if (p.K <= 64) return recurrent::launch<64>(p, stream);
  if (p.K <= 128) return recurrent::launch<128>(p, stream);
  return recurrent::launch<256>(p, stream);
}

const char* recurrent_unsupported(bool backward, int T, int K, int V, int sm_major) {
  if (sm_major < 8) return "the recurrent kernels are built for sm_80 or newer";
  if (K < 1 || K > 256) return "the recurrent kernels need 1 <= K <= 256";
  if (V < 1) return "the recurrent kernels need V >= 1";
  if (backward && T > kRecurrentBwdMaxT)
    return "the recurrent backward kernel takes sequences of at most 16 tokens "
           "(it recomputes states, O(T^2))";
  return nullptr;
}

}  // namespace gla
