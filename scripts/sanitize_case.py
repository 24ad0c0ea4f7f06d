"""A small varlen case for compute-sanitizer: the GPU backends named on the command
line (default: cuda and triton), forward and backward."""
import sys

import torch

import gla_cuda
from gla_cuda import dispatch

cu = torch.tensor([0, 0, 1, 70, 200, 263], dtype=torch.int32, device="cuda")
T, H, K, V = 263, 2, 64, 64
q, k, v = (torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16) for d in (K, K, V))
g = (torch.nn.functional.logsigmoid(torch.randn(1, T, H, K, device="cuda")) / 16).bfloat16()
h0 = torch.randn(5, H, K, V, device="cuda")
for backend in sys.argv[1:] or ("cuda", "triton"):
    for form, fn in (("chunk", gla_cuda.chunk_gla), ("recurrent", gla_cuda.fused_recurrent_gla)):
        if dispatch.choose(f"{form}_fwd", q, k, v, g, h0, cu, backend).backend is None:
            continue
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
        o, ht = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu,
                   backend=backend)
        if dispatch.choose(f"{form}_bwd", q, k, v, g, h0, cu, backend).backend is not None:
            (o.float().sum() + ht.sum()).backward()
        torch.cuda.synchronize()
        print(f"{backend} {form}: ran")
