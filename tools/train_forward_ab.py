"""The training forward at K = 128 on Hopper, side by side in one process, by the kernel it runs:
the two stages (prep, then the wgmma walk; training's default), the warp-specialised kernel's
kSave form (GLA_CUDA_K128_FORWARD=fused) and the mma.sync kernel (GLA_CUDA_NO_WGMMA=1): the
training forward alone, fwd+bwd under auto, the inference forward, and how far the kept
tensors are from the default's.
    python tools/train_forward_ab.py [B,T,H,K,V ...]"""
import os
import sys

import torch
from triton.testing import do_bench

import gla_cuda
from gla_cuda.intermediates import NAMES as KEPT
from gla_cuda.testing import make_inputs

NAMES = ("o", "ht") + KEPT
MODES = {"two_stage": {}, "fused": {"GLA_CUDA_K128_FORWARD": "fused"}, "mma.sync": {"GLA_CUDA_NO_WGMMA": "1"}}
shapes = [tuple(map(int, s.split(","))) for s in (sys.argv[1:] or ["8,2048,16,128,128", "2,8192,16,128,128"])]
for shape in shapes:
    B, T, H, K, V = shape
    q, k, v, g = (make_inputs(B, T, H, K, V, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=True)[n]
                  for n in "qkvg")
    do = torch.randn_like(v)
    args = (q.detach(), k.detach(), v.detach(), g.detach(), K ** -0.5, None, False, None, "auto")
    kept = {}
    for mode in list(MODES) + ["two_stage"]:  # the default twice: drift shows
        for name in ("GLA_CUDA_K128_FORWARD", "GLA_CUDA_NO_WGMMA"):
            os.environ.pop(name, None)
        os.environ.update(MODES[mode])

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
    for name in ("GLA_CUDA_K128_FORWARD", "GLA_CUDA_NO_WGMMA"):
        os.environ.pop(name, None)
    for mode in ("fused", "mma.sync"):
        for name, x, y in zip(NAMES, kept[mode], kept["two_stage"]):
            if x.numel() and name != "flags":
                x, y = x.float(), y.float()
                print(f"  {name}: {mode} vs two_stage rel {((x - y).norm() / y.norm().clamp_min(1e-30)).item():.2e}")
