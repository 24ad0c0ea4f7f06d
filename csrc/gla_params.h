// Kernel-side description of one GLA call. No torch headers here: kernel files
// include only this, CUDA and CUTLASS/CuTe, so they compile quickly and in parallel.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace gla {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// All tensors are contiguous. q, k, g: [B, T, H, K]; v, o: [B, T, H, V];
// states: float32 [N, H, K, V]. With cu_seqlens (int32, [N + 1], on the device)
// B == 1 and sequence n spans tokens [cu_seqlens[n], cu_seqlens[n + 1]).
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* g;
  void* o;
  const float* h0;            // initial state or nullptr
  float* ht;                  // final state or nullptr
  const int32_t* cu_seqlens;  // or nullptr
  int B, T, H, K, V, N;
  float scale;
  DType dtype;                // of q, k, v, o
  DType g_dtype;              // kFloat32 or dtype
  int num_sms;                // of the current device
};

}  // namespace gla
