"""Small varlen cases for compute-sanitizer: the GPU backends named on the command line
(default: cuda, triton and auto; training runs the compiled forward that keeps the backward's
intermediates and, in bf16, the compiled backward that takes them), forward and backward, chunked and recurrent, plus a short
recurrent case (the CUDA recurrent backward takes T <= 16), the pooled decode op and the pooled
prefill."""
import os
import sys

import torch

import gla_cuda
from gla_cuda import dispatch


def inputs(T, H, K, V, N, dtype=torch.bfloat16):
    q, k, v = (torch.randn(1, T, H, d, device="cuda", dtype=dtype) for d in (K, K, V))
    g = (torch.nn.functional.logsigmoid(torch.randn(1, T, H, K, device="cuda")) / 16).to(dtype)
    return q, k, v, g, torch.randn(N, H, K, V, device="cuda")


def run(fn, q, k, v, g, h0, cu, backend, backward):
    """One call of fn with gradients on every input, and its backward if asked."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, ht = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu, backend=backend)
    if backward:
        (o.float().sum() + ht.sum()).backward()


cases = [(torch.tensor([0, 0, 1, 70, 200, 263], dtype=torch.int32, device="cuda"), inputs(263, 2, 64, 64, 5)),
         (torch.tensor([0, 0, 1, 7, 12], dtype=torch.int32, device="cuda"), inputs(12, 2, 100, 72, 4)),
         # two K and two V tiles of the compiled backward's kernels
         (torch.tensor([0, 63, 64, 199], dtype=torch.int32, device="cuda"), inputs(199, 2, 128, 128, 3)),
         # three (sequence, head) pairs and long sequences: the compiled forward's segment split
         # and the backward's split state-gradient walk, in bf16 and float16
         (torch.tensor([0, 600, 601, 1400], dtype=torch.int32, device="cuda"), inputs(1400, 1, 128, 128, 3)),
         (torch.tensor([0, 600, 601, 1400], dtype=torch.int32, device="cuda"),
          inputs(1400, 1, 128, 128, 3, torch.float16)),
         # K = 256: the compiled two-stage forward (prep, then the wgmma walk on sm_90)
         (torch.tensor([0, 0, 1, 70, 200], dtype=torch.int32, device="cuda"), inputs(200, 2, 256, 128, 4))]
for backend in sys.argv[1:] or ("cuda", "triton", "auto"):
    for cu, (q, k, v, g, h0) in cases:
        for form, fn in (("chunk", gla_cuda.chunk_gla), ("recurrent", gla_cuda.fused_recurrent_gla)):
            if dispatch.choose(f"{form}_fwd", q, k, v, g, h0, cu, backend).backend is None:
                continue
            run(fn, q, k, v, g, h0, cu, backend,
                backward=dispatch.choose(f"{form}_bwd", q, k, v, g, h0, cu, backend).backend is not None)
            if form == "chunk":  # inference keeps no intermediates (sm_90, K = 128: the warp-specialised kernel)
                with torch.no_grad():
                    fn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend)
            torch.cuda.synchronize()
            print(f"{backend} {form} T={q.shape[1]} {q.dtype}: ran")
    if backend == "cuda":  # the mma.sync walk of the two-stage forward (other GPUs than sm_90)
        cu, (q, k, v, g, h0) = cases[-1]
        os.environ["GLA_CUDA_NO_WGMMA"] = "1"
        gla_cuda.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="cuda")
        torch.cuda.synchronize()
        del os.environ["GLA_CUDA_NO_WGMMA"]
        print("cuda chunk K=256, mma.sync walk: ran")
    if backend == "auto":  # sm_90, K = 128: the training forward in the warp-specialised kernel
        os.environ["GLA_CUDA_K128_FORWARD"] = "fused"
        for cu, (q, k, v, g, h0) in cases[2:4]:
            run(gla_cuda.chunk_gla, q, k, v, g, h0, cu, "auto", backward=True)
            torch.cuda.synchronize()
        del os.environ["GLA_CUDA_K128_FORWARD"]
        print("auto chunk K=128, GLA_CUDA_K128_FORWARD=fused: ran")
    q, k, v, g = (x.view(4, 3, *x.shape[2:]) for x in inputs(12, 2, 100, 72, 1)[:4])
    pool = torch.randn(6, 2, 72, 100, device="cuda")  # [P, H, V, K]: state_v_first
    if dispatch.choose("recurrent_pool_fwd_", q, k, v, g, pool, None, backend).backend is not None:
        gla_cuda.fused_recurrent_gla_pooled(q, k, v, g, pool, torch.tensor([5, -1, 0, 9], device="cuda"),
                                            state_v_first=True, check_index=False, backend=backend)
        torch.cuda.synchronize()
        print(f"{backend} pooled decode: ran")
    # the pooled prefill at every compiled kernel's head dims (fused sm_80 / Hopper fused at
    # K = 128, two-stage at K = 256), K- and V-first: padding, a fresh sequence, copy-on-write,
    # checkpoints every 64 tokens, an empty sequence
    for K, V, v_first in ((64, 64, False), (128, 128, True), (128, 256, False), (256, 128, True)):
        cu = torch.tensor([0, 130, 130, 131, 260], dtype=torch.int32, device="cuda")
        q, k, v, g, _ = inputs(260, 2, K, V, 1)
        pool = torch.randn(12, 2, *((V, K) if v_first else (K, V)), device="cuda")
        if dispatch.choose("chunk_pool_fwd_", q, k, v, g, pool, cu, backend).backend is None:
            continue
        gla_cuda.chunk_gla_pooled(q, k, v, g, pool, torch.tensor([3, 5, -1, 7], device="cuda"), cu,
                                  has_initial_state=torch.tensor([True, False, True, True], device="cuda"),
                                  final_state_indices=torch.tensor([4, 5, 1, -1], device="cuda"),
                                  checkpoint_every=64,
                                  checkpoint_indices=torch.tensor([[8, 9], [-1, -1], [0, 2], [10, 11]], device="cuda"),
                                  state_v_first=v_first, backend=backend)
        torch.cuda.synchronize()
        print(f"{backend} pooled prefill K={K} V={V} v_first={v_first}: ran")
