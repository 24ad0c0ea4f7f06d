// Standalone check of the fused chunked forward (no torch): random inputs, a float64
// host reference of the naive recurrence, relative error norms for o and the final
// state, NaN-poisoned outputs, and CUDA-event timings.
//
//   chunk_fwd_test            all checks, then timings
//   chunk_fwd_test small      one small varlen case (for compute-sanitizer)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "chunk_fwd/chunk_fwd.h"

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__,    \
                  __LINE__, #x);                                                       \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

using gla::DType;

static uint16_t to_half_bits(float x, DType dt) {
  uint16_t r;
  if (dt == DType::kBFloat16) {
    __nv_bfloat16 b = __float2bfloat16(x);
    std::memcpy(&r, &b, 2);
  } else {
    __half b = __float2half(x);
    std::memcpy(&r, &b, 2);
  }
  return r;
}
static float from_half_bits(uint16_t r, DType dt) {
  if (dt == DType::kBFloat16) {
    __nv_bfloat16 b;
    std::memcpy(&b, &r, 2);
    return __bfloat162float(b);
  }
  __half b;
  std::memcpy(&b, &r, 2);
  return __half2float(b);
}

enum class Gate { kNormal, kMinus20, kNearZero, kMixed };

struct Case {
  const char* name;
  DType dt, gdt;
  int B, T, H, K, V;
  std::vector<int> cu;  // empty: no varlen
  Gate gate;
  bool h0, ht;
};

struct Host {
  std::vector<float> q, k, v, g;  // rounded values, [tokens, H, D]
  std::vector<uint16_t> qb, kb, vb, gb;
  std::vector<float> gf, h0;
};

static std::mt19937_64 rng(1234);

static void fill_inputs(const Case& c, int tokens, int N, Host& hs) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  const size_t nq = size_t(tokens) * c.H * c.K, nv = size_t(tokens) * c.H * c.V;
  hs.q.resize(nq); hs.k.resize(nq); hs.g.resize(nq); hs.v.resize(nv);
  hs.qb.resize(nq); hs.kb.resize(nq); hs.vb.resize(nv); hs.gb.resize(nq); hs.gf.resize(nq);
  for (size_t i = 0; i < nq; ++i) {
    hs.qb[i] = to_half_bits(nd(rng), c.dt); hs.q[i] = from_half_bits(hs.qb[i], c.dt);
    hs.kb[i] = to_half_bits(nd(rng), c.dt); hs.k[i] = from_half_bits(hs.kb[i], c.dt);
    float g;
    switch (c.gate) {
      case Gate::kNormal: { float x = 4.f * nd(rng); g = (x > 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x))) / 16.f; break; }
      case Gate::kMinus20: g = -20.f; break;
      case Gate::kNearZero: g = -1e-4f * ud(rng); break;
      default: { float u = ud(rng); g = u < 0.3f ? -20.f * ud(rng) : (u < 0.6f ? -1e-5f * ud(rng) : -0.5f * ud(rng)); }
    }
    if (c.gdt == DType::kFloat32) { hs.gf[i] = g; hs.g[i] = g; }
    else { hs.gb[i] = to_half_bits(g, c.gdt); hs.g[i] = from_half_bits(hs.gb[i], c.gdt); }
  }
  for (size_t i = 0; i < nv; ++i) { hs.vb[i] = to_half_bits(nd(rng), c.dt); hs.v[i] = from_half_bits(hs.vb[i], c.dt); }
  hs.h0.assign(c.h0 ? size_t(N) * c.H * c.K * c.V : 0, 0.f);
  for (auto& x : hs.h0) x = nd(rng);
}

static void reference(const Case& c, const std::vector<int>& bounds, const Host& hs, float scale,
                      std::vector<double>& o, std::vector<double>& st) {
  const int H = c.H, K = c.K, V = c.V, N = int(bounds.size()) - 1;
  o.assign(size_t(bounds.back()) * H * V, 0.0);
  st.assign(size_t(N) * H * K * V, 0.0);
  std::vector<double> S(size_t(K) * V);
  for (int n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h) {
      for (size_t i = 0; i < S.size(); ++i) S[i] = c.h0 ? hs.h0[(size_t(n) * H + h) * K * V + i] : 0.0;
      for (int t = bounds[n]; t < bounds[n + 1]; ++t) {
        const size_t bq = (size_t(t) * H + h) * K, bv = (size_t(t) * H + h) * V;
        for (int a = 0; a < K; ++a) {
          const double eg = std::exp(double(hs.g[bq + a])), ka = hs.k[bq + a];
          double* Sr = &S[size_t(a) * V];
          for (int b = 0; b < V; ++b) Sr[b] = eg * Sr[b] + ka * hs.v[bv + b];
        }
        for (int b = 0; b < V; ++b) o[bv + b] = 0.0;
        for (int a = 0; a < K; ++a) {
          const double qa = scale * double(hs.q[bq + a]);
          const double* Sr = &S[size_t(a) * V];
          for (int b = 0; b < V; ++b) o[bv + b] += qa * Sr[b];
        }
      }
      std::copy(S.begin(), S.end(), st.begin() + (size_t(n) * H + h) * K * V);
    }
}

struct Dev {
  void *q = nullptr, *k = nullptr, *v = nullptr, *g = nullptr, *o = nullptr;
  float *h0 = nullptr, *ht = nullptr;
  int* cu = nullptr;
  void* ws = nullptr;  // chunk_fwd's workspace
  void free_all() {
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(g); cudaFree(o); cudaFree(h0); cudaFree(ht); cudaFree(cu);
    cudaFree(ws);
  }
  void alloc_workspace(const gla::FwdParams& p) {
    const size_t bytes = gla::chunk_fwd_workspace_bytes(p);
    if (bytes > 0 && cudaMalloc(&ws, bytes) != cudaSuccess) ws = nullptr;
  }
};

static int g_sm_major = 0, g_sm_minor = 0, g_num_sms = 0;

static bool run_case(const Case& c) {
  std::vector<int> bounds;
  int N;
  if (c.cu.empty()) { N = c.B; for (int n = 0; n <= N; ++n) bounds.push_back(n * c.T); }
  else { N = int(c.cu.size()) - 1; bounds = c.cu; }
  const int tokens = bounds.back();
  Host hs;
  fill_inputs(c, tokens, N, hs);
  const float scale = 1.f / std::sqrt(float(c.K));
  Dev d;
  const size_t nq = hs.q.size(), nv = hs.v.size(), ns = size_t(N) * c.H * c.K * c.V;
  CK(cudaMalloc(&d.q, std::max<size_t>(nq, 8) * 2)); CK(cudaMalloc(&d.k, std::max<size_t>(nq, 8) * 2));
  CK(cudaMalloc(&d.v, std::max<size_t>(nv, 8) * 2)); CK(cudaMalloc(&d.o, std::max<size_t>(nv, 8) * 2));
  const size_t gbytes = c.gdt == DType::kFloat32 ? 4 : 2;
  CK(cudaMalloc(&d.g, std::max<size_t>(nq, 8) * gbytes));
  CK(cudaMemcpy(d.q, hs.qb.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.k, hs.kb.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.v, hs.vb.data(), nv * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.g, c.gdt == DType::kFloat32 ? (const void*)hs.gf.data() : (const void*)hs.gb.data(),
                nq * gbytes, cudaMemcpyHostToDevice));
  CK(cudaMemset(d.o, 0xff, nv * 2));  // NaN in bf16 and fp16
  if (c.h0) { CK(cudaMalloc(&d.h0, ns * 4)); CK(cudaMemcpy(d.h0, hs.h0.data(), ns * 4, cudaMemcpyHostToDevice)); }
  if (c.ht) { CK(cudaMalloc(&d.ht, ns * 4)); CK(cudaMemset(d.ht, 0xff, ns * 4)); }
  if (!c.cu.empty()) {
    CK(cudaMalloc(&d.cu, c.cu.size() * 4));
    CK(cudaMemcpy(d.cu, c.cu.data(), c.cu.size() * 4, cudaMemcpyHostToDevice));
  }
  gla::FwdParams p{};
  p.q = d.q; p.k = d.k; p.v = d.v; p.g = d.g; p.o = d.o; p.h0 = d.h0; p.ht = d.ht; p.cu_seqlens = d.cu;
  p.B = c.cu.empty() ? c.B : 1; p.T = c.cu.empty() ? c.T : tokens; p.H = c.H; p.K = c.K; p.V = c.V; p.N = N;
  p.scale = scale; p.dtype = c.dt; p.g_dtype = c.gdt; p.num_sms = g_num_sms;
  const char* why = gla::chunk_fwd_unsupported(p, g_sm_major, g_sm_minor);
  if (why) { std::printf("%-34s UNSUPPORTED: %s\n", c.name, why); d.free_all(); return false; }
  d.alloc_workspace(p);
  CK(gla::chunk_fwd(p, d.ws, 0));
  CK(cudaDeviceSynchronize());

  std::vector<uint16_t> ob(nv);
  CK(cudaMemcpy(ob.data(), d.o, nv * 2, cudaMemcpyDeviceToHost));
  std::vector<float> ht(c.ht ? ns : 0);
  if (c.ht) CK(cudaMemcpy(ht.data(), d.ht, ns * 4, cudaMemcpyDeviceToHost));
  std::vector<double> ro, rs;
  reference(c, bounds, hs, scale, ro, rs);
  double num = 0, den = 0, snum = 0, sden = 0;
  size_t nan_o = 0, nan_s = 0;
  for (size_t i = 0; i < nv; ++i) {
    const double x = from_half_bits(ob[i], c.dt);
    if (!std::isfinite(x)) { ++nan_o; continue; }
    num += (x - ro[i]) * (x - ro[i]); den += ro[i] * ro[i];
  }
  for (size_t i = 0; i < ht.size(); ++i) {
    if (!std::isfinite(ht[i])) { ++nan_s; continue; }
    snum += (ht[i] - rs[i]) * (ht[i] - rs[i]); sden += rs[i] * rs[i];
  }
  const double eo = std::sqrt(num / std::max(den, 1e-300)), es = c.ht ? std::sqrt(snum / std::max(sden, 1e-300)) : 0.0;
  const double tol = c.dt == DType::kBFloat16 ? 1.5e-2 : 4e-3;
  const bool ok = nan_o == 0 && nan_s == 0 && (nv == 0 || eo < tol) && es < tol;
  std::printf("%-34s o_err %.3e  ht_err %.3e  nonfinite o %zu ht %zu  %s\n", c.name, eo, es, nan_o, nan_s,
              ok ? "PASS" : "FAIL");
  d.free_all();
  return ok;
}

static void time_case(const char* name, DType dt, DType gdt, int B, int T, int H, int K, int V) {
  const size_t nq = size_t(B) * T * H * K, nv = size_t(B) * T * H * V;
  const size_t gbytes = gdt == DType::kFloat32 ? 4 : 2;
  std::vector<uint16_t> hq(nq), hv(nv);
  std::vector<uint16_t> hg(nq);
  std::vector<float> hgf(gdt == DType::kFloat32 ? nq : 0);
  std::mt19937 r2(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : hq) x = to_half_bits(nd(r2), dt);
  for (auto& x : hv) x = to_half_bits(nd(r2), dt);
  for (size_t i = 0; i < nq; ++i) {
    const float g = -0.05f * std::fabs(nd(r2));
    if (gdt == DType::kFloat32) hgf[i] = g; else hg[i] = to_half_bits(g, gdt);
  }
  Dev d;
  CK(cudaMalloc(&d.q, nq * 2)); CK(cudaMalloc(&d.k, nq * 2)); CK(cudaMalloc(&d.v, nv * 2));
  CK(cudaMalloc(&d.o, nv * 2)); CK(cudaMalloc(&d.g, nq * gbytes));
  CK(cudaMemcpy(d.q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.k, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.v, hv.data(), nv * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.g, gdt == DType::kFloat32 ? (const void*)hgf.data() : (const void*)hg.data(), nq * gbytes,
                cudaMemcpyHostToDevice));
  gla::FwdParams p{};
  p.q = d.q; p.k = d.k; p.v = d.v; p.g = d.g; p.o = d.o;
  p.B = B; p.T = T; p.H = H; p.K = K; p.V = V; p.N = B; p.scale = 1.f / std::sqrt(float(K));
  p.dtype = dt; p.g_dtype = gdt; p.num_sms = g_num_sms;
  const char* why = gla::chunk_fwd_unsupported(p, g_sm_major, g_sm_minor);
  if (why) { std::printf("%-40s UNSUPPORTED: %s\n", name, why); d.free_all(); return; }
  d.alloc_workspace(p);
  for (int i = 0; i < 3; ++i) CK(gla::chunk_fwd(p, d.ws, 0));
  CK(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < 25; ++i) {
    CK(cudaEventRecord(e0));
    CK(gla::chunk_fwd(p, d.ws, 0));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float t; CK(cudaEventElapsedTime(&t, e0, e1)); ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double bytes = double(nq) * (2 * 2 + gbytes) + double(nv) * 2 * 2;
  std::printf("%-40s median %.4f ms  min %.4f ms  (%.0f GB/s of q,k,v,g,o)\n", name, ms[ms.size() / 2], ms[0],
              bytes / (ms[ms.size() / 2] * 1e-3) / 1e9);
  cudaEventDestroy(e0); cudaEventDestroy(e1);
  d.free_all();
}

int main(int argc, char** argv) {
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  g_sm_major = prop.major; g_sm_minor = prop.minor; g_num_sms = prop.multiProcessorCount;
  std::printf("device %s sm_%d%d, %d SMs\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  const DType bf = DType::kBFloat16, fp = DType::kFloat16, f32 = DType::kFloat32;
  if (argc > 1 && std::string(argv[1]) == "small") {
    int bad = 0;
    bad += !run_case({"small varlen bf16 K64 V64", bf, bf, 1, 0, 2, 64, 64, {0, 0, 1, 70, 133}, Gate::kNormal, true, true});
    bad += !run_case({"small varlen fp16 K128 V128", fp, f32, 1, 0, 1, 128, 128, {0, 65, 65, 100}, Gate::kMixed, true, true});
    bad += !run_case({"small split bf16 K64 V64 T600", bf, bf, 1, 600, 1, 64, 64, {}, Gate::kNormal, true, true});
    bad += !run_case({"small varlen bf16 K256 V512", bf, bf, 1, 0, 1, 256, 512, {0, 0, 1, 70, 133}, Gate::kNormal, true, true});
    bad += !run_case({"small split bf16 K128 V256 T700", bf, bf, 1, 700, 1, 128, 256, {}, Gate::kMixed, true, true});
    return bad ? 1 : 0;
  }
  if (argc > 1 && std::string(argv[1]) == "bench64") {
    time_case("bf16 gbf (32,2048,16,64,64)", bf, bf, 32, 2048, 16, 64, 64);
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "bench") {  // bench [B T H K V] (profilers: one shape)
    int s[5] = {8, 2048, 16, 128, 128};
    for (int i = 0; i < 5 && i + 2 < argc; ++i) s[i] = std::atoi(argv[i + 2]);
    time_case("bf16 gbf (bench shape)", bf, bf, s[0], s[1], s[2], s[3], s[4]);
    return 0;
  }
  int fails = 0;
  std::vector<Case> cases = {
      {"bf16 g32 K128 V128 T200 h0 ht", bf, f32, 2, 200, 3, 128, 128, {}, Gate::kNormal, true, true},
      {"bf16 gbf K128 V128 T64", bf, bf, 1, 64, 2, 128, 128, {}, Gate::kNormal, false, true},
      {"bf16 gbf K128 V64 T131", bf, bf, 2, 131, 2, 128, 64, {}, Gate::kNormal, true, true},
      {"bf16 g32 K128 V256 T100 g=-20", bf, f32, 1, 100, 2, 128, 256, {}, Gate::kMinus20, true, true},
      {"fp16 g32 K64 V64 T130 g=-20", fp, f32, 2, 130, 2, 64, 64, {}, Gate::kMinus20, false, true},
      {"fp16 gfp K64 V128 T77 g~0", fp, fp, 1, 77, 3, 64, 128, {}, Gate::kNearZero, true, true},
      {"bf16 g32 K256 V512 T150 g~0", bf, f32, 1, 150, 1, 256, 512, {}, Gate::kNearZero, true, true},
      {"fp16 gfp K256 V64 T300 mixed", fp, fp, 1, 300, 2, 256, 64, {}, Gate::kMixed, true, true},
      {"bf16 g32 K128 V128 T1 ", bf, f32, 3, 1, 2, 128, 128, {}, Gate::kNormal, true, true},
      {"bf16 g32 K128 V128 T0", bf, f32, 2, 0, 2, 128, 128, {}, Gate::kNormal, true, true},
      {"bf16 g32 K256 V128 T0", bf, f32, 2, 0, 2, 256, 128, {}, Gate::kNormal, true, true},
      {"varlen bf16 gbf K128 V128", bf, bf, 1, 0, 2, 128, 128, {0, 0, 1, 65, 200, 333, 333, 400}, Gate::kNormal, true, true},
      {"varlen fp16 g32 K64 V256 mixed", fp, f32, 1, 0, 2, 64, 256, {0, 5, 69, 69, 200}, Gate::kMixed, false, true},
      {"varlen bf16 g32 K256 V128 no states", bf, f32, 1, 0, 1, 256, 128, {0, 1, 129, 250}, Gate::kNormal, false, false},
      {"fp16 g32 K128 V512 T257 mixed", fp, f32, 1, 257, 2, 128, 512, {}, Gate::kMixed, true, true},
      // few CTAs and long sequences: segment splitting (two passes)
      {"split bf16 g32 K128 V128 T1000", bf, f32, 1, 1000, 2, 128, 128, {}, Gate::kNormal, true, true},
      {"split bf16 gbf K128 V64 T1000 no h0", bf, bf, 1, 1000, 1, 128, 64, {}, Gate::kNearZero, false, true},
      {"split varlen fp16 gfp K64 V64", fp, fp, 1, 0, 1, 64, 64, {0, 700, 701, 1500, 1500, 2100}, Gate::kNormal, true, true},
      {"split fp16 g32 K256 V128 T900 mixed", fp, f32, 1, 900, 1, 256, 128, {}, Gate::kMixed, true, true},
      {"split bf16 g32 K128 V256 T2000 g~0", bf, f32, 1, 2000, 1, 128, 256, {}, Gate::kNearZero, true, true},
      {"split bf16 gbf K128 V128 T3000 11 segs", bf, bf, 1, 3000, 1, 128, 128, {}, Gate::kNormal, true, true},
      {"split fp16 g32 K128 V128 g=-20 T700", fp, f32, 1, 700, 1, 128, 128, {}, Gate::kMinus20, true, true},
  };
  for (const auto& c : cases) fails += !run_case(c);
  std::printf("%d case(s) failed\n", fails);
  time_case("bf16 gbf (8,2048,16,128,128)", bf, bf, 8, 2048, 16, 128, 128);
  time_case("bf16 g32 (8,2048,16,128,128)", bf, f32, 8, 2048, 16, 128, 128);
  time_case("bf16 gbf (2,8192,16,128,128)", bf, bf, 2, 8192, 16, 128, 128);
  time_case("bf16 gbf (32,2048,16,64,64)", bf, bf, 32, 2048, 16, 64, 64);
  time_case("bf16 gbf (8,2048,4,256,512)", bf, bf, 8, 2048, 4, 256, 512);
  time_case("bf16 gbf (1,32768,8,128,128)", bf, bf, 1, 32768, 8, 128, 128);
  time_case("bf16 gbf (4,2048,16,128,128)", bf, bf, 4, 2048, 16, 128, 128);
  return fails ? 1 : 0;
}
