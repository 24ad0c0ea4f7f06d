// gla_cuda._C: registers the compiled kernels as CUDA implementations of the
// private ops gla::cuda_* (schemas live in gla_cuda/ops.py) and exposes, through
// pybind11, which inputs each kernel covers and what was built.
// The only file that includes torch headers: kernel files stay torch-free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "chunk_fwd/chunk_fwd.h"
#include "gla_params.h"

namespace gla {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK(false, "gla_cuda: unsupported dtype ", t);
  }
}

DType dtype_from_name(const std::string& name) {
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float32") return DType::kFloat32;
  TORCH_CHECK(false, "gla_cuda: unknown dtype name ", name);
}

void check_cuda_contiguous(const at::Tensor& x, const char* name, const at::Device& device) {
  TORCH_CHECK(x.is_cuda() && x.device() == device, name, " must be on ", device);
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> cuda_chunk_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    double scale, const std::optional<at::Tensor>& initial_state, bool output_final_state,
    const std::optional<at::Tensor>& cu_seqlens) {
  const auto device = q.device();
  for (auto [x, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&g, "g"}})
    check_cuda_contiguous(*x, name, device);
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && g.sizes() == q.sizes() && v.dim() == 4,
              "cuda_chunk_fwd: q, k, g must be [B, T, H, K] and v [B, T, H, V]");
  c10::cuda::CUDAGuard guard(device);

  FwdParams p{};
  p.B = q.size(0); p.T = q.size(1); p.H = q.size(2); p.K = q.size(3); p.V = v.size(3);
  p.N = cu_seqlens ? cu_seqlens->numel() - 1 : p.B;
  p.scale = static_cast<float>(scale);
  p.dtype = to_dtype(q.scalar_type());
  p.g_dtype = to_dtype(g.scalar_type());
  int sm_major = 0, sm_minor = 0;
  cudaDeviceGetAttribute(&sm_major, cudaDevAttrComputeCapabilityMajor, device.index());
  cudaDeviceGetAttribute(&sm_minor, cudaDevAttrComputeCapabilityMinor, device.index());
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, device.index());

  at::Tensor o = at::empty(v.sizes(), v.options());
  at::Tensor ht = output_final_state
      ? at::empty({p.N, p.H, p.K, p.V}, q.options().dtype(at::kFloat))
      : at::empty({0}, q.options().dtype(at::kFloat));
  if (initial_state) {
    check_cuda_contiguous(*initial_state, "initial_state", device);
    TORCH_CHECK(initial_state->scalar_type() == at::kFloat, "initial_state must be float32");
    p.h0 = initial_state->data_ptr<float>();
  }
  if (cu_seqlens) {
    check_cuda_contiguous(*cu_seqlens, "cu_seqlens", device);
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt, "cu_seqlens must be int32 here");
    p.cu_seqlens = cu_seqlens->data_ptr<int32_t>();
  }
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.g = g.data_ptr();
  p.o = o.data_ptr();
  p.ht = output_final_state ? ht.data_ptr<float>() : nullptr;
  if (const char* why = chunk_fwd_unsupported(p, sm_major, sm_minor))
    TORCH_CHECK(false, "cuda_chunk_fwd: ", why);
  if (std::getenv("GLA_DEBUG_POISON")) {  // tests: any element the kernel misses stays NaN
    o.fill_(std::numeric_limits<float>::quiet_NaN());
    ht.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  if (p.B * p.T > 0 || output_final_state) {
    cudaError_t err = chunk_fwd(p, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "cuda_chunk_fwd launch failed: ", cudaGetErrorString(err));
  }
  return {o, ht};
}

// For gla_cuda.backends.cuda: nullptr-or-reason, without building tensors.
std::optional<std::string> unsupported(const std::string& op, int K, int V, const std::string& dtype,
                                       const std::string& g_dtype, int sm_major, int sm_minor) {
  FwdParams p{};  // one sequence of one token and one head: only the static checks bite
  p.B = p.N = p.T = p.H = 1;
  p.K = K; p.V = V;
  p.dtype = dtype_from_name(dtype);
  p.g_dtype = dtype_from_name(g_dtype);
  const char* why = nullptr;
  if (op == "chunk_fwd") why = chunk_fwd_unsupported(p, sm_major, sm_minor);
  else why = "no compiled kernel for this op";
  if (why) return std::string(why);
  return std::nullopt;
}

}  // namespace
}  // namespace gla

TORCH_LIBRARY_IMPL(gla, CUDA, m) { m.impl("cuda_chunk_fwd", &gla::cuda_chunk_fwd); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "gla_cuda compiled CUDA kernels (registered under torch.ops.gla.cuda_*)";
  m.def("unsupported", &gla::unsupported,
        "None if the compiled kernel for op covers these inputs, else the reason");
  m.attr("cuda_archs") = GLA_CUDA_ARCHS;  // set by CMake from TORCH_CUDA_ARCH_LIST
}
