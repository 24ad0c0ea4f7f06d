"""Gradient errors with gates of -20 per step (fla, ours), then fwd+bwd / bwd of auto against fla
at the shapes given, in one process.
    python scripts/dev_bwd_extra.py [B,T,H,K,V ...]"""
import sys

from gla_cuda import bench

cands = bench.candidates("cuda")
for name in ("fla", "auto", "triton"):
    fn = cands[name][0]
    for gate in ("normal", "strong"):
        errs = bench.accuracy(fn, "cuda", (8, 272, 16, 128, 128), gate=gate, grads=True)
        print(f"{name:7s} {gate:6s} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
for shape in (tuple(map(int, a.split(","))) for a in sys.argv[1:]):
    res = {}
    for name in ("fla", "auto"):
        res[name] = bench.time_candidate(cands[name][0], shape, "cuda", ("fwdbwd", "bwd"))
        print(shape, name, {m: round(t, 3) for m, t in res[name][0].items()},
              {m: round(b / 2**20) for m, b in res[name][1].items()}, flush=True)
    print(shape, "auto vs fla:", {m: round(res["fla"][0][m] / res["auto"][0][m], 2) for m in res["auto"][0]},
          flush=True)
