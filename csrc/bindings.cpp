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
#include <vector>

#include "chunk_bwd/chunk_bwd.h"
#include "chunk_fwd/chunk_fwd.h"
#include "gla_params.h"
#include "intermediates.h"
#include "recurrent/recurrent.h"

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

at::ScalarType to_scalar_type(DType t) {
  switch (t) {
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kFloat32: return at::kFloat;
    case DType::kInt8: return at::kChar;
  }
  TORCH_CHECK(false, "gla_cuda: unknown DType ", int(t));
}

// The training forward's kept tensors and the backward's dh: dtypes, shapes and their order are
// intermediates.h's (one layout for the kernels, these bindings and the Triton backend).
at::ScalarType kept_state_dtype(const at::Tensor& q) {
  return to_scalar_type(intermediates::kept_state_dtype(to_dtype(q.scalar_type())));
}

at::ScalarType kept_dtype(intermediates::Kept which, const at::Tensor& q) {
  return to_scalar_type(intermediates::dtype(which, to_dtype(q.scalar_type())));
}

std::vector<int64_t> kept_sizes(intermediates::Kept which, const GlaParams& p, int64_t num_slots) {
  const intermediates::Shape s = intermediates::shape(which, p.B, p.T, p.H, p.K, p.V, num_slots);
  return std::vector<int64_t>(s.size, s.size + s.rank);
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

// tests: any element a kernel misses stays NaN (-1 in integer flags, which are 0 or 1)
void poison(std::initializer_list<at::Tensor*> outs) {
  if (std::getenv("GLA_DEBUG_POISON") == nullptr) return;
  for (at::Tensor* x : outs) {
    if (x->is_floating_point()) x->fill_(std::numeric_limits<float>::quiet_NaN());
    else x->fill_(-1);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " launch failed: ", cudaGetErrorString(err));
}

// A float32 state pool [P, H, K, V] ([P, H, V, K] with state_v_first) on `device`.
void check_pool(const at::Tensor& pool, int64_t H, int64_t K, int64_t V, bool v_first, const at::Device& device) {
  check_cuda_contiguous(pool, "state_pool", device);
  TORCH_CHECK(pool.scalar_type() == at::kFloat, "state_pool must be float32");
  const std::vector<int64_t> slot = v_first ? std::vector<int64_t>{H, V, K} : std::vector<int64_t>{H, K, V};
  TORCH_CHECK(pool.dim() == 4 && pool.sizes().slice(1) == at::IntArrayRef(slot),
              "state_pool must be [P, H, K, V] ([P, H, V, K] with state_v_first)");
}

// An int32 or int64 tensor of pool slots of the given shape on `device`: its address (*int64 set).
const void* slot_indices(const at::Tensor& x, const char* name, at::IntArrayRef shape, const at::Device& device,
                         bool* int64) {
  check_cuda_contiguous(x, name, device);
  TORCH_CHECK(x.sizes() == shape && (x.scalar_type() == at::kInt || x.scalar_type() == at::kLong), name,
              " must be an int32 or int64 tensor of shape ", shape);
  *int64 = x.scalar_type() == at::kLong;
  return x.data_ptr();
}

// q, k, g [B, T, H, K] and v [B, T, H, V]: contiguous, on q's device, one dtype.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                  const char* op) {
  for (auto [x, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&g, "g"}})
    check_cuda_contiguous(*x, name, q.device());
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && g.sizes() == q.sizes() && v.dim() == 4 &&
                  v.sizes().slice(0, 3) == q.sizes().slice(0, 3),
              op, ": q, k, g must be [B, T, H, K] and v [B, T, H, V]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype");
}

// The fields the chunked kernels' FwdParams and BwdParams share: shapes, dtypes, the device's
// SMs, q/k/v/g and cu_seqlens (checked). Returns the compute capability.
template <class Params>
std::pair<int, int> chunk_params(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& g, double scale,
                                 const std::optional<at::Tensor>& cu_seqlens) {
  const auto device = q.device();
  p.B = q.size(0); p.T = q.size(1); p.H = q.size(2); p.K = q.size(3); p.V = v.size(3);
  p.N = cu_seqlens ? cu_seqlens->numel() - 1 : p.B;
  p.scale = static_cast<float>(scale);
  p.dtype = to_dtype(q.scalar_type());
  p.g_dtype = to_dtype(g.scalar_type());
  int sm_major = 0, sm_minor = 0;
  cudaDeviceGetAttribute(&sm_major, cudaDevAttrComputeCapabilityMajor, device.index());
  cudaDeviceGetAttribute(&sm_minor, cudaDevAttrComputeCapabilityMinor, device.index());
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, device.index());
  if (cu_seqlens) {
    check_cuda_contiguous(*cu_seqlens, "cu_seqlens", device);
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt, "cu_seqlens must be int32 here");
    p.cu_seqlens = cu_seqlens->data_ptr<int32_t>();
  }
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.g = g.data_ptr();
  return {sm_major, sm_minor};
}

// The fused chunked forward; `kept` (training): also the Triton backward's intermediates
// (FwdParams::save_*), allocated here for num_slots chunk slots.
std::tuple<at::Tensor, at::Tensor> chunk_fwd_call(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    double scale, const std::optional<at::Tensor>& initial_state, bool output_final_state,
    const std::optional<at::Tensor>& cu_seqlens, std::vector<at::Tensor>* kept,
    const at::Tensor* chunk_off, int64_t num_slots) {
  const auto device = q.device();
  check_inputs(q, k, v, g, "cuda_chunk_fwd");
  c10::cuda::CUDAGuard guard(device);

  FwdParams p{};
  const auto [sm_major, sm_minor] = chunk_params(p, q, k, v, g, scale, cu_seqlens);

  at::Tensor o = at::empty(v.sizes(), v.options());
  at::Tensor ht = output_final_state
      ? at::empty({p.N, p.H, p.K, p.V}, q.options().dtype(at::kFloat))
      : at::empty({0}, q.options().dtype(at::kFloat));
  if (initial_state) {
    check_cuda_contiguous(*initial_state, "initial_state", device);
    TORCH_CHECK(initial_state->scalar_type() == at::kFloat, "initial_state must be float32");
    p.h0 = initial_state->data_ptr<float>();
  }
  p.o = o.data_ptr();
  p.ht = output_final_state ? ht.data_ptr<float>() : nullptr;
  if (const char* why = chunk_fwd_unsupported(p, sm_major, sm_minor))
    TORCH_CHECK(false, "cuda_chunk_fwd: ", why);
  poison({&o, &ht});
  if (kept != nullptr) {
    check_cuda_contiguous(*chunk_off, "chunk_off", device);
    TORCH_CHECK(chunk_off->scalar_type() == at::kLong && chunk_off->numel() == p.N + 1,
                "cuda_chunk_fwd_saving: chunk_off must be int64 [N + 1]");
    TORCH_CHECK(num_slots >= 0, "cuda_chunk_fwd_saving: num_slots must be >= 0");
    kept->clear();
    for (int i = 0; i < intermediates::kNumKept; ++i) {
      const auto which = intermediates::Kept(i);
      kept->push_back(at::empty(kept_sizes(which, p, num_slots), q.options().dtype(kept_dtype(which, q))));
      poison({&kept->back()});
    }
    p.chunk_off = chunk_off->data_ptr<int64_t>();
    p.save_a = (*kept)[intermediates::kA].data_ptr();
    p.save_flags = (*kept)[intermediates::kFlags].data_ptr<int8_t>();
    p.save_qx = (*kept)[intermediates::kQx].data_ptr();
    p.save_kd = (*kept)[intermediates::kKd].data_ptr();
    p.save_decay = (*kept)[intermediates::kDecays].data_ptr<float>();
    p.save_h = (*kept)[intermediates::kStates].data_ptr();
  }
  if (p.B * p.T > 0 || output_final_state) {
    const at::Tensor ws = at::empty({int64_t(chunk_fwd_workspace_bytes(p))}, q.options().dtype(at::kByte));
    check_launch(chunk_fwd(p, ws.numel() > 0 ? ws.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream()),
                 "cuda_chunk_fwd");
  }
  return {o, ht};
}

std::tuple<at::Tensor, at::Tensor> cuda_chunk_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    double scale, const std::optional<at::Tensor>& initial_state, bool output_final_state,
    const std::optional<at::Tensor>& cu_seqlens) {
  return chunk_fwd_call(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                        nullptr, nullptr, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cuda_chunk_fwd_saving(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                      double scale, const std::optional<at::Tensor>& initial_state,
                      bool output_final_state, const std::optional<at::Tensor>& cu_seqlens,
                      const at::Tensor& chunk_off, int64_t num_slots) {
  std::vector<at::Tensor> kept;
  auto [o, ht] = chunk_fwd_call(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                                &kept, &chunk_off, num_slots);
  static_assert(intermediates::kNumKept == 6, "the op's schema returns six kept tensors");
  return {o, ht, kept[0], kept[1], kept[2], kept[3], kept[4], kept[5]};
}

// The chunked backward's checks and fields for the inputs, do, initial_state and dht.
std::pair<int, int> bwd_params(BwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& g, double scale, const std::optional<at::Tensor>& initial_state,
                               const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& dout,
                               const std::optional<at::Tensor>& dht, const char* op) {
  const auto device = q.device();
  check_inputs(q, k, v, g, op);
  check_cuda_contiguous(dout, "do", device);
  TORCH_CHECK(dout.sizes() == v.sizes() && dout.scalar_type() == v.scalar_type(), op, ": do must be like v");
  const auto sm = chunk_params(p, q, k, v, g, scale, cu_seqlens);
  for (auto [x, name] : {std::pair{&initial_state, "initial_state"}, {&dht, "dht"}}) {
    if (!*x) continue;
    check_cuda_contiguous(**x, name, device);
    TORCH_CHECK((*x)->scalar_type() == at::kFloat, name, " must be float32");
    TORCH_CHECK((*x)->sizes() == at::IntArrayRef({p.N, p.H, p.K, p.V}), name, " must be [N, H, K, V]");
  }
  if (dht) p.dht = dht->data_ptr<float>();
  p.dout = dout.data_ptr();
  return sm;
}

// The chunked backward from a training forward's intermediates (cuda_chunk_fwd_saving's or the
// Triton forward's, one layout): the dh walk, dv, then dq/dk/dg, every chunk in parallel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_chunk_bwd_saved(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    double scale, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& dout,
    const std::optional<at::Tensor>& dht, const at::Tensor& chunk_off, const at::Tensor& chunk_seq,
    const at::Tensor& A, const at::Tensor& flags, const at::Tensor& qx, const at::Tensor& kd,
    const at::Tensor& decays, const at::Tensor& states) {
  // flags is checked but not read: dq/dk/dg take the exact form for every chunk (one reference
  // row measured slower)
  const auto device = q.device();
  c10::cuda::CUDAGuard guard(device);
  BwdParams p{};
  const auto [sm_major, sm_minor] = bwd_params(p, q, k, v, g, scale, initial_state, cu_seqlens, dout, dht,
                                               "cuda_chunk_bwd_saved");
  const int64_t S = chunk_seq.numel();
  for (auto [x, name] : {std::pair{&chunk_off, "chunk_off"}, {&chunk_seq, "chunk_seq"}})
    check_cuda_contiguous(*x, name, device);
  TORCH_CHECK(chunk_off.scalar_type() == at::kLong && chunk_off.numel() == p.N + 1 &&
                  chunk_seq.scalar_type() == at::kLong && chunk_seq.dim() == 1,
              "cuda_chunk_bwd_saved: chunk_off must be int64 [N + 1] and chunk_seq int64 [slots]");
  const at::Tensor* saved[intermediates::kNumKept] = {&A, &flags, &qx, &kd, &decays, &states};
  for (int i = 0; i < intermediates::kNumKept; ++i) {
    const auto which = intermediates::Kept(i);
    const char* name = intermediates::kNames[i];
    check_cuda_contiguous(*saved[i], name, device);
    const std::vector<int64_t> sizes = kept_sizes(which, p, S);
    const at::ScalarType dtype = kept_dtype(which, q);
    TORCH_CHECK(saved[i]->scalar_type() == dtype && saved[i]->sizes() == at::IntArrayRef(sizes),
                "cuda_chunk_bwd_saved: ", name, " must be ", dtype, " of shape ", at::IntArrayRef(sizes),
                " (the training forward's layout for these inputs and ", S, " chunk slots), got ",
                saved[i]->scalar_type(), " of shape ", saved[i]->sizes());
  }
  const auto state_dtype = kept_state_dtype(q);  // of dh below, as of the kept states
  p.chunk_off = chunk_off.data_ptr<int64_t>();
  p.chunk_seq = chunk_seq.data_ptr<int64_t>();
  p.num_slots = S;
  p.saved_a = A.data_ptr();
  p.saved_qx = qx.data_ptr();
  p.saved_kd = kd.data_ptr();
  p.saved_decay = decays.data_ptr<float>();
  p.saved_h = states.data_ptr();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dg = at::empty(g.sizes(), g.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dh0 = at::empty(initial_state ? at::IntArrayRef({p.N, p.H, p.K, p.V}) : at::IntArrayRef({0}),
                             q.options().dtype(at::kFloat));
  at::Tensor dh = at::empty({S, p.H, p.K, p.V}, q.options().dtype(state_dtype));
  poison({&dq, &dk, &dg, &dv, &dh0, &dh});
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dg = dg.data_ptr();
  p.dv = dv.data_ptr();
  p.dh0 = initial_state ? dh0.data_ptr<float>() : nullptr;
  p.dh = dh.data_ptr();
  if (const char* why = chunk_bwd_unsupported(p, sm_major, sm_minor))
    TORCH_CHECK(false, "cuda_chunk_bwd_saved: ", why);
  const at::Tensor ws = at::empty({int64_t(chunk_bwd_workspace_bytes(p))}, q.options().dtype(at::kByte));
  check_launch(chunk_bwd(p, ws.numel() > 0 ? ws.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream()), "cuda_chunk_bwd_saved");
  return {dq, dk, dv, dg, dh0};
}

// q, k, v, g checked and described for the recurrent kernels (everything but outputs).
RecurrentParams recurrent_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& g, double scale,
                                 const std::optional<at::Tensor>& cu_seqlens, bool backward,
                                 const char* op) {
  const auto device = q.device();
  check_inputs(q, k, v, g, op);
  RecurrentParams p{};
  p.B = q.size(0); p.T = q.size(1); p.H = q.size(2); p.K = q.size(3); p.V = v.size(3);
  p.N = cu_seqlens ? cu_seqlens->numel() - 1 : p.B;
  TORCH_CHECK(p.H <= 65535, op, ": at most 65535 heads");
  p.scale = static_cast<float>(scale);
  p.dtype = to_dtype(q.scalar_type());
  p.g_dtype = to_dtype(g.scalar_type());
  TORCH_CHECK(p.g_dtype == DType::kFloat32 || p.g_dtype == p.dtype, op,
              ": g must be float32 or q's dtype");
  int sm_major = 0;
  cudaDeviceGetAttribute(&sm_major, cudaDevAttrComputeCapabilityMajor, device.index());
  if (const char* why = recurrent_unsupported(backward, p.T, p.K, p.V, sm_major))
    TORCH_CHECK(false, op, ": ", why);
  if (cu_seqlens) {
    check_cuda_contiguous(*cu_seqlens, "cu_seqlens", device);
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt, "cu_seqlens must be int32 here");
    TORCH_CHECK(p.B == 1, op, ": cu_seqlens needs B == 1");
    p.cu_seqlens = cu_seqlens->data_ptr<int32_t>();
  }
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.g = g.data_ptr();
  return p;
}

const float* state_ptr(const std::optional<at::Tensor>& x, const char* name, const RecurrentParams& p,
                       const at::Device& device) {
  if (!x) return nullptr;
  check_cuda_contiguous(*x, name, device);
  TORCH_CHECK(x->scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(x->sizes() == at::IntArrayRef({p.N, p.H, p.K, p.V}), name, " must be [N, H, K, V]");
  return x->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> cuda_recurrent_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    double scale, const std::optional<at::Tensor>& initial_state, bool output_final_state,
    const std::optional<at::Tensor>& cu_seqlens) {
  c10::cuda::CUDAGuard guard(q.device());
  RecurrentParams p = recurrent_params(q, k, v, g, scale, cu_seqlens, false, "cuda_recurrent_fwd");
  p.h0 = state_ptr(initial_state, "initial_state", p, q.device());
  at::Tensor o = at::empty(v.sizes(), v.options());
  at::Tensor ht = at::empty(output_final_state ? at::IntArrayRef({p.N, p.H, p.K, p.V}) : at::IntArrayRef({0}),
                            q.options().dtype(at::kFloat));
  poison({&o, &ht});
  p.o = o.data_ptr();
  p.ht = output_final_state ? ht.data_ptr<float>() : nullptr;
  check_launch(recurrent_fwd(p, c10::cuda::getCurrentCUDAStream()), "cuda_recurrent_fwd");
  return {o, ht};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_recurrent_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    double scale, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& dout,
    const std::optional<at::Tensor>& dht) {
  c10::cuda::CUDAGuard guard(q.device());
  RecurrentParams p = recurrent_params(q, k, v, g, scale, cu_seqlens, true, "cuda_recurrent_bwd");
  check_cuda_contiguous(dout, "do", q.device());
  TORCH_CHECK(dout.sizes() == v.sizes() && dout.scalar_type() == v.scalar_type(),
              "cuda_recurrent_bwd: do must be like v");
  p.h0 = state_ptr(initial_state, "initial_state", p, q.device());
  p.dht = state_ptr(dht, "dht", p, q.device());
  p.dout = dout.data_ptr();
  const int64_t tiles = (p.V + 63) / 64;
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor parts = at::empty({3, tiles, p.B, p.T, p.H, p.K}, f32);  // dq, dk, dg per V tile
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dh0 = at::empty(initial_state ? at::IntArrayRef({p.N, p.H, p.K, p.V}) : at::IntArrayRef({0}), f32);
  poison({&parts, &dv, &dh0});
  p.dq_part = parts[0].data_ptr<float>();
  p.dk_part = parts[1].data_ptr<float>();
  p.dg_part = parts[2].data_ptr<float>();
  p.dv = dv.data_ptr();
  p.dh0 = initial_state ? dh0.data_ptr<float>() : nullptr;
  check_launch(recurrent_bwd(p, c10::cuda::getCurrentCUDAStream()), "cuda_recurrent_bwd");
  at::Tensor sums = parts.sum(1);  // over V tiles, in a fixed order
  return {sums[0].to(q.scalar_type()), sums[1].to(k.scalar_type()), dv, sums[2].to(g.scalar_type()),
          dh0};
}

at::Tensor cuda_recurrent_pool_fwd_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& g, double scale, at::Tensor& state_pool,
                                    const at::Tensor& state_index, bool state_v_first) {
  c10::cuda::CUDAGuard guard(q.device());
  RecurrentParams p = recurrent_params(q, k, v, g, scale, std::nullopt, false, "cuda_recurrent_pool_fwd_");
  check_pool(state_pool, p.H, p.K, p.V, state_v_first, q.device());
  p.pool = state_pool.data_ptr<float>();
  p.P = state_pool.size(0);
  p.index = slot_indices(state_index, "state_index", {p.B}, q.device(), &p.index_int64);
  p.state_v_first = state_v_first;
  at::Tensor o = at::empty(v.sizes(), v.options());
  poison({&o});
  p.o = o.data_ptr();
  check_launch(recurrent_fwd(p, c10::cuda::getCurrentCUDAStream()), "cuda_recurrent_pool_fwd_");
  return o;
}

// The serving prefill: packed sequences from and to pool slots (FwdParams, gla_params.h), o
// (preallocated) and the pool written in place.
void cuda_chunk_pool_fwd_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                          double scale, at::Tensor& state_pool, const at::Tensor& state_indices,
                          const std::optional<at::Tensor>& has_initial_state,
                          const std::optional<at::Tensor>& final_state_indices, const at::Tensor& cu_seqlens,
                          int64_t checkpoint_every, const std::optional<at::Tensor>& checkpoint_indices,
                          bool state_v_first, at::Tensor& o) {
  const auto device = q.device();
  check_inputs(q, k, v, g, "cuda_chunk_pool_fwd_");
  c10::cuda::CUDAGuard guard(device);
  FwdParams p{};
  const auto [sm_major, sm_minor] = chunk_params(p, q, k, v, g, scale, cu_seqlens);
  check_pool(state_pool, p.H, p.K, p.V, state_v_first, device);
  check_cuda_contiguous(o, "o", device);
  TORCH_CHECK(o.sizes() == v.sizes() && o.scalar_type() == v.scalar_type(), "o must be v's shape and dtype");
  p.h0 = p.ht = state_pool.data_ptr<float>();
  p.P = int(state_pool.size(0));
  p.state_v_first = state_v_first;
  p.slot_in = slot_indices(state_indices, "state_indices", {p.N}, device, &p.slot_in_int64);
  p.slot_out = final_state_indices
      ? slot_indices(*final_state_indices, "final_state_indices", {p.N}, device, &p.slot_out_int64)
      : p.slot_in;
  if (!final_state_indices) p.slot_out_int64 = p.slot_in_int64;
  if (has_initial_state) {
    check_cuda_contiguous(*has_initial_state, "has_initial_state", device);
    TORCH_CHECK(has_initial_state->scalar_type() == at::kBool && has_initial_state->sizes() == at::IntArrayRef({p.N}),
                "has_initial_state must be a bool [N] tensor");
    p.has_h0 = has_initial_state->data_ptr<bool>();
  }
  if (checkpoint_indices) {
    TORCH_CHECK(checkpoint_indices->dim() == 2, "checkpoint_indices must be [N, M]");
    p.ckpt_slots = slot_indices(*checkpoint_indices, "checkpoint_indices", {p.N, checkpoint_indices->size(1)},
                                device, &p.ckpt_int64);
    p.ckpt_count = int(checkpoint_indices->size(1));
    p.ckpt_every = int(checkpoint_every);
  }
  p.o = o.data_ptr();
  if (const char* why = chunk_fwd_unsupported(p, sm_major, sm_minor))
    TORCH_CHECK(false, "cuda_chunk_pool_fwd_: ", why);
  poison({&o});
  const at::Tensor ws = at::empty({int64_t(chunk_fwd_workspace_bytes(p))}, q.options().dtype(at::kByte));
  check_launch(chunk_fwd(p, ws.numel() > 0 ? ws.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream()),
               "cuda_chunk_pool_fwd_");
}

// For gla_cuda.backends.cuda: nullptr-or-reason, without building tensors.
std::optional<std::string> unsupported(const std::string& op, int T, int K, int V,
                                       const std::string& dtype, const std::string& g_dtype,
                                       int sm_major, int sm_minor, int device) {
  // the checks query the device (shared memory per block): the tensors' GPU, not the current one
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const char* why = nullptr;
  FwdParams fp{};  // one sequence of one token and one head: only the static checks bite
  fp.B = fp.N = fp.T = fp.H = 1;
  fp.K = K; fp.V = V;
  fp.dtype = dtype_from_name(dtype);
  fp.g_dtype = dtype_from_name(g_dtype);
  if (op == "chunk_fwd" || op == "chunk_pool_fwd_") {
    why = chunk_fwd_unsupported(fp, sm_major, sm_minor);
  } else if (op == "chunk_bwd") {
    BwdParams p{};  // as above
    p.B = p.N = p.T = p.H = 1;
    p.K = K; p.V = V;
    p.dtype = fp.dtype;
    p.g_dtype = fp.g_dtype;
    // without saved intermediates the compiled training forward makes them first
    why = chunk_bwd_unsupported(p, sm_major, sm_minor);
    if (why == nullptr) why = chunk_fwd_unsupported(fp, sm_major, sm_minor);
  } else if (op == "recurrent_fwd" || op == "recurrent_pool_fwd_" || op == "recurrent_bwd") {
    why = recurrent_unsupported(op == "recurrent_bwd", T, K, V, sm_major);
  } else {
    why = "no compiled kernel for this op";
  }
  if (why) return std::string(why);
  return std::nullopt;
}

}  // namespace
}  // namespace gla

TORCH_LIBRARY_IMPL(gla, CUDA, m) {
  m.impl("cuda_chunk_fwd", &gla::cuda_chunk_fwd);
  m.impl("cuda_chunk_fwd_saving", &gla::cuda_chunk_fwd_saving);
  m.impl("cuda_chunk_bwd_saved", &gla::cuda_chunk_bwd_saved);
  m.impl("cuda_recurrent_fwd", &gla::cuda_recurrent_fwd);
  m.impl("cuda_recurrent_bwd", &gla::cuda_recurrent_bwd);
  m.impl("cuda_recurrent_pool_fwd_", &gla::cuda_recurrent_pool_fwd_);
  m.impl("cuda_chunk_pool_fwd_", &gla::cuda_chunk_pool_fwd_);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "gla_cuda compiled CUDA kernels (registered under torch.ops.gla.cuda_*)";
  m.def("unsupported", &gla::unsupported,
        "None if the compiled kernel for op covers these inputs, else the reason");
  m.attr("cuda_archs") = GLA_CUDA_ARCHS;  // set by CMake from TORCH_CUDA_ARCH_LIST
}
