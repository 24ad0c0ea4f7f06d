"""The chunked backward from the training forward's intermediates, compiled against Triton, side
by side in one process: the backward alone on the same kept tensors (each launch of the compiled
one too; where its state-gradient walk splits the sequences, also with GLA_CUDA_DH_SPLIT=0),
the gradients' distance between the two, and fwd+bwd with each backward. --compiled: the
compiled backward's timings only (no Triton compiles).
    python tools/bwd_ab.py [--fp16] [--compiled] [B,T,H,K,V ...]"""
import os
import sys

import torch
from triton.testing import do_bench

import gla_cuda
from gla_cuda.backends import cuda as cuda_backend
from gla_cuda.backends.triton import chunk as triton_chunk
from gla_cuda.bench import time_candidate
from gla_cuda.intermediates import ChunkSlots
from gla_cuda.testing import make_inputs

NAMES = ("dq", "dk", "dv", "dg")
args = [a for a in sys.argv[1:] if not a.startswith("--")]
dtype = torch.float16 if "--fp16" in sys.argv else torch.bfloat16
compiled_only = "--compiled" in sys.argv
shapes = [tuple(map(int, s.split(","))) for s in (args or ["8,2048,16,128,128", "2,8192,16,128,128"])]
for shape in shapes:
    B, T, H, K, V = shape
    q, k, v, g = (make_inputs(B, T, H, K, V, dtype=dtype, device="cuda", seed=0)[n] for n in "qkvg")
    do = torch.randn_like(v)
    scale = K ** -0.5
    _, _, saved = cuda_backend.chunk_fwd_saving(q, k, v, g, scale, None, False, None)
    meta = ChunkSlots(q, None)

    def ours():
        return torch.ops.gla.cuda_chunk_bwd_saved(q, k, v, g, scale, None, None, do, None, meta.chunk_off,
                                                  meta.chunk_seq, *saved)

    def triton():
        return triton_chunk.chunk_bwd(q, k, v, g, scale, None, None, do, None, saved=saved)

    a = ours()
    t_ours = do_bench(ours, warmup=50, rep=300)
    if compiled_only:
        print(f"{shape} {dtype} backward alone: compiled {t_ours:.3f} ms", flush=True)
    else:
        b = triton()
        dist = {n: ((x.float() - y.float()).norm() / y.float().norm()).item() for n, x, y in zip(NAMES, a, b)}
        t_triton = do_bench(triton, warmup=50, rep=300)
        print(f"{shape} {dtype} backward alone: compiled {t_ours:.3f} ms, Triton {t_triton:.3f} ms "
              f"({t_triton / t_ours:.2f}x); compiled vs Triton rel {dist}", flush=True)
    os.environ["GLA_CUDA_DH_SPLIT"] = "0"
    unsplit = ours()
    t_unsplit = do_bench(ours, warmup=50, rep=300)
    del os.environ["GLA_CUDA_DH_SPLIT"]
    gap = max(((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a, unsplit))
    print(f"  without the dh walk's split: {t_unsplit:.3f} ms (largest rel distance to split: {gap:.1e})",
          flush=True)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            ours()
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and "chunk_bwd" in e.key:
            print(f"    {e.key[:70]:70s} {e.device_time / 1e3:.3f} ms", flush=True)
    if compiled_only:
        continue
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g)]
    for backend in ("cuda", "triton", "auto"):
        def fb():
            o = gla_cuda.chunk_gla(*leaves, backend=backend)[0]
            torch.autograd.grad(o, leaves, do)
        fb()
        print(f"  fwd+bwd {backend:6s} {do_bench(fb, warmup=50, rep=300):.3f} ms", flush=True)
    for backend in ("cuda", "auto"):
        res, peak, host = time_candidate(lambda q, k, v, g: gla_cuda.chunk_gla(q, k, v, g, backend=backend),
                                               shape, "cuda", ("fwd", "fwdbwd", "bwd"), dtype=dtype)
        args = (q, k, v, g, scale, None, False, None, backend)
        t_train = do_bench(lambda: torch.ops.gla.chunk_fwd_train(*args), warmup=50, rep=300)
        print(f"  {backend}: ms {res} host {host} peak MiB {({m: b / 2**20 for m, b in peak.items()})} "
              f"training fwd {t_train:.3f} ms", flush=True)
