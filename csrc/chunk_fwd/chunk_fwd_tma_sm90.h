// Host side of the Hopper kernels' TMA loads (chunk_fwd_twostage_walk_sm90.cu, chunk_fwd_fused_sm90.cu):
// tensor maps over [rows, H, width] 16-bit tensors, encoded with the driver's encoder looked up
// at run time (no link against libcuda).
#pragma once

#include <cstdint>

#include <cuda.h>          // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

namespace gla {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// rows x H x width 16-bit elements, row-major; boxes of 64 x 1 x 64 with the 128-byte swizzle
// (the wgmma layouts); rows past the tensor read as zero.
inline bool encode_map(CUtensorMap* map, const void* base, int64_t rows, int H, int width) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {cuuint64_t(width), cuuint64_t(H), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(width) * 2, cuuint64_t(H) * width * 2};
  const cuuint32_t box[3] = {64, 1, 64}, elem[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, const_cast<void*>(base), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace gla
