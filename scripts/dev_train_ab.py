"""The training forward at K = 128 on Hopper, side by side in one process: the mma.sync kernel
keeping the Triton backward's intermediates (the default) against the warp-specialised kernel's
kSave form (GLA_CUDA_FUSED_SM90_TRAIN=1): the training forward alone, fwd+bwd under auto, the
inference forward, and how far apart the two kernels' kept tensors are.
    python scripts/dev_train_ab.py [B,T,H,K,V ...]"""
import os
import sys

import torch
from triton.testing import do_bench

import gla_cuda
from gla_cuda import bench

NAMES = ("o", "ht", "A", "flags", "qx", "kd", "decays", "states")
shapes = [tuple(map(int, s.split(","))) for s in (sys.argv[1:] or ["8,2048,16,128,128", "2,8192,16,128,128"])]
for shape in shapes:
    B, T, H, K, V = shape
    q, k, v, g = bench.make_inputs(B, T, H, K, V, "cuda", requires_grad=True)
    do = torch.randn_like(v)
    args = (q.detach(), k.detach(), v.detach(), g.detach(), K ** -0.5, None, False, None, "auto")
    kept = {}
    for mode in ("mma.sync", "fused", "mma.sync"):  # twice: drift shows
        if mode == "fused":
            os.environ["GLA_CUDA_FUSED_SM90_TRAIN"] = "1"
        else:
            os.environ.pop("GLA_CUDA_FUSED_SM90_TRAIN", None)

        def train():
            return torch.ops.gla.chunk_fwd_train(*args)

        def fwd_bwd():
            o = gla_cuda.chunk_gla(q, k, v, g)[0]
            torch.autograd.grad(o, (q, k, v, g), do)

        kept.setdefault(mode, train())
        fwd_bwd()
        torch.cuda.synchronize()
        t_train = do_bench(train, warmup=50, rep=300)
        t_fb = do_bench(fwd_bwd, warmup=50, rep=300)
        with torch.no_grad():
            t_inf = do_bench(lambda: gla_cuda.chunk_gla(q, k, v, g), warmup=50, rep=300)
        print(f"{shape} {mode:9s} training fwd {t_train:.3f} ms  fwd+bwd {t_fb:.3f} ms  inference fwd {t_inf:.3f} ms",
              flush=True)
    os.environ.pop("GLA_CUDA_FUSED_SM90_TRAIN", None)
    for name, x, y in zip(NAMES, kept["fused"], kept["mma.sync"]):
        if x.numel():
            x, y = x.float(), y.float()
            print(f"  {name}: fused vs mma.sync rel {((x - y).norm() / y.norm().clamp_min(1e-30)).item():.2e}")
