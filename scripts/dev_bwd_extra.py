"""Gradient errors with ordinary gates and gates of -20 per step (fla, ours), then fwd+bwd / bwd
of auto against fla at the shapes given, in one process. --fp16: float16 q, k, v (g float32).
    python scripts/dev_bwd_extra.py [--fp16] [B,T,H,K,V ...]"""
import sys

import torch

from gla_cuda import bench

fp16 = "--fp16" in sys.argv
dtype, g_dtype = (torch.float16, torch.float32) if fp16 else (torch.bfloat16, None)

cands = bench.candidates("cuda")
for name in ("auto", "triton", "fla"):
    fn = cands[name][0]
    for gate in ("normal", "strong"):
        try:
            errs = bench.accuracy(fn, "cuda", (8, 272, 16, 128, 128), gate=gate, dtype=dtype, g_dtype=g_dtype)
        except Exception as e:  # fla may not take every dtype pair
            print(f"{name:7s} {gate:6s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        print(f"{name:7s} {gate:6s} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
for shape in (tuple(map(int, a.split(","))) for a in sys.argv[1:] if a != "--fp16"):
    res = {}
    for name in ("fla", "auto"):
        res[name] = bench.time_candidate(cands[name][0], shape, "cuda", ("fwdbwd", "bwd"), dtype=dtype)
        print(shape, name, {m: round(t, 3) for m, t in res[name][0].items()},
              {m: round(b / 2**20) for m, b in res[name][1].items()}, flush=True)
    print(shape, "auto vs fla:", {m: round(res["fla"][0][m] / res["auto"][0][m], 2) for m in res["auto"][0]},
          flush=True)
