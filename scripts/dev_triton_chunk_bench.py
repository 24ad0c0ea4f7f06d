"""Dev benchmark of the Triton chunked GLA kernels against fla-core's chunk_gla.

    python scripts/dev_triton_chunk_bench.py [--no-check] [--no-sweep] [--budget SECONDS]
    python scripts/dev_triton_chunk_bench.py --warm ITEM   # check:0..6 graph shape:0..3 fla:0..3 sweep:KEY[:SHAPE]

Compiling every kernel variant takes minutes in one process; start the --warm items in
parallel first (they fill Triton's cache), then run the main script.

1. correctness on CUDA against the float64 oracle (reference.naive_*), CUDA-graph capture;
2. bf16 timings (triton.testing.do_bench median) of forward and forward+backward at the
   DESIGN §3 shapes, side by side with fla.ops.gla.chunk_gla, plus a per-kernel breakdown;
3. an optional sweep of launch parameters (chunk.TUNE) while the time budget lasts.

Run fla (--warm fla:I, or the fla timings) alone: its first call autotunes for minutes and
any timing taken while it runs is worthless (seen: 2-4x slower kernels).  --no-fla times
ours only.

Notes (H100 80GB HBM3, torch 2.11, triton 3.6, bf16, ms, fwd / fwd+bwd):
  shape               | one kernel per chunk | A kernel + light o/dv | + gate kernel, A by sub-blocks | + one reference row | + dq/dk loads first, gate in A | fla 0.6.0
  8,2048,16,128,128   | 1.13 / 4.20          | 0.85 / 3.76           | 0.64 / 3.18                    | 0.56 / 2.32         | 0.50 / 2.04                    | 0.83 / 3.52
  2,8192,16,128,128   | 1.17 / 4.32          | 0.96 / 4.09           | 0.71 / 3.40                    | 0.63 / 2.53         | 0.57 / 2.20                    | 1.05 / 3.83
  32,2048,16,64,64    | 1.99 / 7.41          | 1.46 / 6.75           | 1.23 / 6.03                    | 1.05 / 4.36         | 0.93 / 3.84                    | 1.60 / 6.37
  8,2048,4,256,512    | 1.06 / 4.28          | 0.91 / 3.67           | 0.52 / 2.43                    | 0.49 / 1.97         | 0.47 / 1.71                    | 0.69 / 2.99
  (fla from a separate run; the last column with A's K tiles of 32, before they became 64:
  forward+backward 0.02-0.07 ms less.)  Per kernel at 8,2048,16,128,128 (last of ours): A
  with the gated operands 0.25 in fwd, 0.33 in bwd, h 0.09, o 0.13, dh 0.10, dv 0.13, dA
  0.07, dq/dk/dg 0.77 (1.50 with the exact hierarchy).  fla: A 0.41 (two kernels), h 0.15,
  o 0.19, cumsum 0.07, bwd intra 0.98 + inter 0.64.
  SWEEP_KEYS=A,dqk limits the sweep to those groups.
  Registers and spills without a GPU: triton.compile(ASTSource(fn=M._dqk_kernel, signature=...,
  constexprs=...), target=GPUTarget("cuda", 90, 32)) works on the CPU machine, and Triton's own
  ptxas -v --gpu-name sm_90a on the PTX prints them (seen: dq/dk/dg 255 registers with spills).
"""
import argparse
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import warnings

warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _load("gla_ref", "gla_cuda/backends/reference.py")
# GLA_CHUNK=path: another version of the kernels (A/B runs against a saved copy)
M = _load("gla_triton_chunk", os.environ.get("GLA_CHUNK", "gla_cuda/backends/triton/chunk.py"))
T0 = time.time()


def rel(a, b):
    if a is None and b is None:
        return 0.0
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    d = b.norm().item()
    return (a - b).norm().item() / d if d > 0 else (a - b).norm().item()


def make(B, T, H, K, V, dtype, gmode="ls", N=None, dev="cuda", seed=0):
    torch.manual_seed(seed)
    N = N or B
    q = torch.randn(B, T, H, K, device=dev).to(dtype)
    k = torch.randn(B, T, H, K, device=dev).to(dtype)
    v = torch.randn(B, T, H, V, device=dev).to(dtype)
    if gmode == "ls":
        g = F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16
    elif gmode == "neg20":
        g = -20 + 0.5 * torch.rand(B, T, H, K, device=dev)
    elif gmode == "mixed":  # head 0: channels 16-31 strong (the exact hierarchy); others weak
        g = F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16
        g[:, :, 0, 16:32] = -3 + torch.rand(B, T, 16, device=dev)
    else:
        g = torch.zeros(B, T, H, K, device=dev)
    do = torch.randn(B, T, H, V, device=dev).to(dtype)
    h0 = torch.randn(N, H, K, V, device=dev)
    dht = torch.randn(N, H, K, V, device=dev)
    return q, k, v, g.to(dtype), do, h0, dht


def check(only=None):
    cases = [  # H, K, V chosen so that most compilations are shared with the timings
        dict(B=2, T=300, H=16, K=128, V=128, dtype=torch.bfloat16),
        dict(B=2, T=300, H=16, K=64, V=64, dtype=torch.bfloat16, gmode="neg20"),
        dict(B=2, T=200, H=4, K=256, V=512, dtype=torch.bfloat16),
        dict(B=1, T=260, H=2, K=100, V=200, dtype=torch.float32, cu=[0, 0, 1, 70, 200, 260]),
        dict(B=2, T=300, H=2, K=64, V=64, dtype=torch.float32, gmode="neg20"),
        dict(B=2, T=130, H=2, K=64, V=64, dtype=torch.float16),
        dict(B=2, T=300, H=4, K=128, V=128, dtype=torch.bfloat16, gmode="mixed"),
    ]
    ok = True
    if only is not None:
        cases = [cases[only]]
    for cs in cases:
        try:
            ok &= check_case(cs)
        except Exception as ex:
            ok = False
            print("ERROR", cs, type(ex).__name__, str(ex)[:1500], flush=True)
    return ok if only is not None else (check_graph() and ok)


def check_case(cs):
    if True:
        cs = dict(cs)
        cu = cs.pop("cu", None)
        dtype = cs["dtype"]
        cus = torch.tensor(cu, device="cuda", dtype=torch.int32) if cu else None
        q, k, v, g, do, h0, dht = make(**cs, N=len(cu) - 1 if cu else None)
        scale = cs["K"] ** -0.5
        d = lambda x: x.double()
        ro, rht = R.naive_fwd(d(q), d(k), d(v), d(g), scale, d(h0), True, cus)
        rg = R.naive_bwd(d(q), d(k), d(v), d(g), scale, d(h0), cus, d(do), d(dht))
        o, ht = M.chunk_fwd(q, k, v, g, scale, h0, True, cus)
        gr = M.chunk_bwd(q, k, v, g, scale, h0, cus, do, dht)
        e = dict(o=rel(o, ro), ht=rel(ht, rht))
        e.update({n: rel(a, b) for n, a, b in zip(["dq", "dk", "dv", "dg", "dh0"], gr, rg)})
        tol = 1e-4 if dtype == torch.float32 else 1.5e-2
        bad = [n for n, x in e.items() if not x <= tol]
        tag = {kk: (str(vv).split(".")[-1] if kk == "dtype" else vv) for kk, vv in cs.items()}
        print("FAIL" if bad else "ok  ", tag, "cu" if cu else "", " ".join(f"{n}={x:.1e}" for n, x in e.items()), flush=True)
        return not bad


def check_graph():
    # CUDA graph capture of a varlen forward+backward
    ok = True
    try:
        q, k, v, g, do, h0, dht = make(1, 260, 2, 64, 64, torch.bfloat16, N=5)
        cus = torch.tensor([0, 0, 1, 70, 200, 260], device="cuda", dtype=torch.int32)
        run = lambda: (M.chunk_fwd(q, k, v, g, 0.125, h0, True, cus), M.chunk_bwd(q, k, v, g, 0.125, h0, cus, do, dht))
        ref = run()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        graph.replay()
        torch.cuda.synchronize()
        err = max(rel(out[0][0], ref[0][0]), rel(out[1][3], ref[1][3]))
        print(f"cuda graph capture ok, replay vs eager rel={err:.1e}", flush=True)
    except Exception as ex:  # pragma: no cover
        ok = False
        print("cuda graph capture FAILED:", type(ex).__name__, ex, flush=True)
    return ok


SHAPES = [(8, 2048, 16, 128, 128), (2, 8192, 16, 128, 128), (32, 2048, 16, 64, 64), (8, 2048, 4, 256, 512)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def ours_fns(B, T, H, K, V):
    q, k, v, g, do, _, _ = make(B, T, H, K, V, torch.bfloat16)
    scale = K ** -0.5
    fwd = lambda: M.chunk_fwd(q, k, v, g, scale, None, False, None)
    fb = lambda: (M.chunk_fwd(q, k, v, g, scale, None, False, None), M.chunk_bwd(q, k, v, g, scale, None, None, do, None))
    return fwd, fb, (q, k, v, g, do, scale)


def _fla():
    try:
        from fla.ops.gla import chunk_gla
        return chunk_gla
    except Exception as ex:
        print("fla not importable:", ex)
        return None


def fla_fns(B, T, H, K, V, chunk_gla):
    q, k, v, g, do, _, _ = make(B, T, H, K, V, torch.bfloat16)
    scale = K ** -0.5
    qs, ks, vs, gs = (x.detach().clone().requires_grad_() for x in (q, k, v, g))

    def fwd():
        with torch.no_grad():
            return chunk_gla(q, k, v, g, scale=scale, initial_state=None, output_final_state=False)

    def fb():
        o, _ = chunk_gla(qs, ks, vs, gs, scale=scale, initial_state=None, output_final_state=False)
        o.backward(do)
    return fwd, fb, (qs, ks, vs, gs, do, scale)


def timings(with_fla=True, budget=1e9):
    """Ours at every shape first (with the per-kernel breakdown), then fla (whose first
    call autotunes: warm it in parallel with --warm fla:I), then the table."""
    res = {}
    for shape in SHAPES:
        try:
            res[shape] = timing_shape(shape)
        except Exception as ex:
            print("ERROR timing", shape, type(ex).__name__, str(ex)[:1500], flush=True)
    chunk_gla = _fla() if with_fla else None
    fl = {}
    for shape in SHAPES:
        if chunk_gla is None or time.time() - T0 > budget:
            break
        try:
            fwd, fb, (qs, ks, vs, gs, do, scale) = fla_fns(*shape, chunk_gla)
            f_f = bench(fwd)
            f_fb = triton.testing.do_bench(fb, warmup=25, rep=100, return_mode="median", grad_to_none=[qs, ks, vs, gs])
            fl[shape] = (f_f, f_fb)
            breakdown(fwd, "fla fwd")
            breakdown(fb, "fla fwd+bwd")
            # agreement with fla (both bf16)
            for x in (qs, ks, vs, gs):
                x.grad = None
            o_f, _ = chunk_gla(qs, ks, vs, gs, scale=scale)
            o_f.backward(do)
            q, k, v, g = (x.detach() for x in (qs, ks, vs, gs))
            o_m, _ = M.chunk_fwd(q, k, v, g, scale, None, False, None)
            gm = M.chunk_bwd(q, k, v, g, scale, None, None, do, None)
            print(f"{shape}: fla fwd {f_f:.3f} fwd+bwd {f_fb:.3f} | ours vs fla: " + " ".join(
                f"{n}={rel(a, b):.1e}" for n, a, b in zip(["o", "dq", "dk", "dv", "dg"], (o_m,) + gm[:4],
                                                          (o_f, qs.grad, ks.grad, vs.grad, gs.grad))), flush=True)
        except Exception as ex:
            print("ERROR fla", shape, type(ex).__name__, str(ex)[:800], flush=True)
    print("| B, T, H, K, V | ours fwd | fla fwd | ratio | ours fwd+bwd | fla fwd+bwd | ratio |")
    for shape in SHAPES:
        if shape not in res:
            continue
        o_f, o_fb = res[shape]
        f = fl.get(shape)
        if f:
            print(f"| {shape} | {o_f:.3f} | {f[0]:.3f} | {o_f / f[0]:.2f} | {o_fb:.3f} | {f[1]:.3f} | {o_fb / f[1]:.2f} |")
        else:
            print(f"| {shape} | {o_f:.3f} | - | - | {o_fb:.3f} | - | - |")
    sys.stdout.flush()


def breakdown(fn, tag):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / 3 / 1000, ev.key[:40]))
    rows.sort(reverse=True)
    print(f"   {tag} kernels (ms/iter): " + ", ".join(f"{n} {t:.3f}" for t, n in rows[:14]), flush=True)


def timing_shape(shape):
    fwd, fb, _ = ours_fns(*shape)
    t_f, t_fb = bench(fwd), bench(fb)
    print(f"{shape}: ours fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms", flush=True)
    breakdown(fwd, "fwd")
    breakdown(fb, "fwd+bwd")
    return t_f, t_fb


# Variants per group: (shapes, fwd or fwd+bwd, list of TUNE overrides {kernel: params}).
KP = "KP"  # BK = the whole (power-of-two) K


# launch variants whose numerics the full check also runs (on top of the defaults)
CHECK_VARIANTS = [{"A": dict(SPAN=-1.0)},  # every chunk flagged: the exact hierarchy everywhere
                  {"A_exact": dict(REF=0), "dqk_exact": dict(REF=2)},
                  # other tiles: the one-reference dq/dk on most cases, the exact one on the
                  # -20 and mixed cases
                  {"o": dict(BV=64), "dv": dict(BV=64), "dqk": dict(BK=64, num_warps=8),
                   "dqk_exact": dict(BK=32, num_warps=4, REF=1)}]


SWEEP = {
    "A": ([0, 2, 3], "fb", [
        {"A": dict(BK=64)}, {"A": dict(BK=32, num_warps=8)}, {"A": dict(BK=16, num_warps=2)},
    ]),
    "dqk": ([0, 2, 3], "fb", [
        {"dqk": dict(num_stages=1)}, {"dqk": dict(BK=16, num_warps=2)}, {"dqk": dict(BV=128)},
        {"dqk": dict(BK=64, num_warps=8)},
    ]),
    "h": ([0, 2, 3], "fwd", [
        {"h": dict(BK=32, BV=64, num_warps=2)}, {"h": dict(BK=64, BV=128, num_warps=4)},
        {"h": dict(num_stages=2)},
    ]),
    "dh": ([0, 2, 3], "fb", [
        {"dh": dict(BK=32, BV=64, num_warps=2)}, {"dh": dict(BK=64, BV=128, num_warps=8)},
    ]),
}


def _resolve(var, K):
    kp = max(16, triton.next_power_of_2(K))
    return {key: {n: (kp if x == KP else x) for n, x in over.items()} for key, over in var.items()}


def sweep(budget, only=None, only_shape=None):
    keys = os.environ.get("SWEEP_KEYS")  # e.g. "A,dqk"
    for key, (shapes, kind, vs) in SWEEP.items():
        if (only is not None and key != only) or (keys and key not in keys.split(",")):
            continue
        for si in shapes:
            if only_shape is not None and si != only_shape:
                continue
            shape = SHAPES[si]
            fwd, fb, _ = ours_fns(*shape)
            fn = fwd if kind == "fwd" else fb
            M.TUNE.clear()
            res = [f"default:{bench(fn):.3f}"]
            for var in vs:
                if time.time() - T0 > budget:
                    print("sweep: out of time", flush=True)
                    return
                M.TUNE.clear()
                M.TUNE.update(_resolve(var, shape[3]))
                try:
                    res.append(f"{var}:{bench(fn):.3f}")
                except Exception as ex:
                    res.append(f"{var}:ERR {type(ex).__name__} {str(ex)[:200]}")
            M.TUNE.clear()
            print(f"sweep {shape} {key} {kind}: " + "  ".join(res), flush=True)


def warm(item):
    """Compile one group of kernels (run several of these in parallel to fill the cache)."""
    kind, _, arg = item.partition(":")
    if kind == "check":
        check(int(arg))
        for var in CHECK_VARIANTS:
            M.TUNE.clear()
            M.TUNE.update(var)
            check(int(arg))
    elif kind == "fla":
        fwd, fb, _ = fla_fns(*SHAPES[int(arg)], _fla())
        fwd(), fb()
    elif kind == "graph":
        check_graph()
    elif kind == "shape":
        fwd, fb, _ = ours_fns(*SHAPES[int(arg)])
        fwd(), fb()
    elif kind == "sweep":
        global bench
        bench = lambda fn: (fn(), 0.0)[1]
        key, _, si = arg.partition(":")
        sweep(1e9, only=key, only_shape=int(si) if si else None)
    torch.cuda.synchronize()
    print(f"warm {item} done in {time.time() - T0:.0f}s", flush=True)


def first_call():
    """Seconds of the first forward and the first backward call per shape (compiling; no
    autotuning), then of a second call: run with an empty TRITON_CACHE_DIR."""
    for shape in SHAPES:
        _, _, (q, k, v, g, do, scale) = ours_fns(*shape)
        times = []
        for _ in range(2):
            t0 = time.time()
            M.chunk_fwd(q, k, v, g, scale, None, False, None)
            torch.cuda.synchronize()
            t1 = time.time()
            M.chunk_bwd(q, k, v, g, scale, None, None, do, None)
            torch.cuda.synchronize()
            times += [t1 - t0, time.time() - t1]
        print(f"{shape}: first call fwd {times[0]:.2f} s, bwd {times[1]:.2f} s; second call fwd "
              f"{times[2] * 1e3:.1f} ms, bwd {times[3] * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", default=None)
    ap.add_argument("--first-call", action="store_true", help="compile time of the first calls (empty the cache first)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-fla", action="store_true", help="time ours only (fla's first call autotunes for minutes)")
    ap.add_argument("--budget", type=float, default=330)
    a = ap.parse_args()
    if a.first_call:
        first_call()
        sys.exit(0)
    if a.warm:
        import warnings
        warnings.filterwarnings("ignore")
        warm(a.warm)
        sys.exit(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    if not a.no_check:
        check()
        for var in CHECK_VARIANTS:
            M.TUNE.clear()
            M.TUNE.update(var)
            print("check with", var, flush=True)
            check()
        M.TUNE.clear()
        print(f"[check done at {time.time() - T0:.0f}s]", flush=True)
    timings(with_fla=not a.no_fla, budget=a.budget)
    print(f"[timings done at {time.time() - T0:.0f}s]", flush=True)
    if not a.no_sweep:
        sweep(a.budget)
