"""The benchmark: gla_cuda's backends side by side with fla and softmax attention.

    python -m gla_cuda.bench [--quick] [--shapes 8,2048,16,128,128 ...] [--out DIR]

For every shape it first checks each backend against the float64 reference on a
small case (a backend that fails is not timed), then times forward, forward+backward
and backward alone (median of triton.testing.do_bench, bf16, g bf16), and prints ms,
the ratio to fla and to SDPA cuDNN, the fraction of the memory floor (bytes that must
move over the copy bandwidth measured in the same run) and peak extra memory.
fla (fla-core) is timed when importable; SDPA flash and cuDNN (causal, same head
dim) are the softmax baselines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import gla_cuda
from gla_cuda import dispatch
from gla_cuda.backends import reference

DEFAULT_SHAPES = [(8, 2048, 16, 128, 128), (2, 8192, 16, 128, 128), (32, 2048, 16, 64, 64),
                  (8, 2048, 4, 256, 512)]
QUICK_SHAPES = [(8, 2048, 16, 128, 128)]
CPU_SHAPES = [(1, 256, 2, 64, 64)]
MODES = ("fwd", "fwdbwd", "bwd")


# ----------------------------------------------------------------------------
# Candidates: name -> function(q, k, v, g) returning (o, final state or None)
# ----------------------------------------------------------------------------

def _ours(backend):
    def run(q, k, v, g, h0=None, final=False):
        return gla_cuda.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=final, backend=backend)
    return run


def _fla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception as e:
        return None, f"fla not importable ({type(e).__name__})"

    def run(q, k, v, g, h0=None, final=False):
        return chunk_gla(q, k, v, g, scale=q.shape[-1] ** -0.5, initial_state=h0, output_final_state=final)
    return run, None


def _sdpa(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]

    def run(q, k, v, g, h0=None, final=False):
        with sdpa_kernel([backend]):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2), None
    return run


def candidates(device):
    out = {"auto": (_ours(None), None)}  # what a user gets: each op on its best backend
    for name in dispatch.BACKENDS:
        out[name] = (_ours(name), None)
    if device == "cuda":
        out["fla"] = _fla()
        out["sdpa_flash"] = (_sdpa("flash"), None)
        out["sdpa_cudnn"] = (_sdpa("cudnn"), None)
    return out


# ----------------------------------------------------------------------------
# Inputs, floor, timing
# ----------------------------------------------------------------------------

def make_inputs(B, T, H, K, V, device, dtype=torch.bfloat16, gate="normal", requires_grad=False, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.float32, generator=gen)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = torch.nn.functional.logsigmoid(r(B, T, H, K)) / 16 if gate == "normal" else -20 - r(B, T, H, K).abs()
    ins = [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v, g)]
    return ins


def floor_bytes(B, T, H, K, V, mode, itemsize=2):
    """Bytes that must move: fwd reads q, k, v, g and writes o; bwd reads q, k, v, g, do
    and writes dq, dk, dv, dg."""
    fwd = 3 * K + 2 * V
    bwd = 6 * K + 3 * V
    per = {"fwd": fwd, "fwdbwd": fwd + bwd, "bwd": bwd}[mode]
    return B * T * H * per * itemsize


def copy_bandwidth(device):
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MB, several times the L2
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x), device)
    return 2 * x.numel() / (ms * 1e-3)


def _bench(fn, device, grad_to_none=None):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                       return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def time_candidate(fn, shape, device, modes):
    """{mode: ms} and the peak extra memory of a forward+backward in bytes."""
    B, T, H, K, V = shape
    q, k, v, g = make_inputs(B, T, H, K, V, device, requires_grad=True)
    leaves = [q, k, v, g]
    res = {}
    if "fwd" in modes:
        with torch.no_grad():
            res["fwd"] = _bench(lambda: fn(q, k, v, g), device)
    do = torch.randn(B, T, H, V, device=device, dtype=q.dtype)

    def fwdbwd():
        o, _ = fn(q, k, v, g)
        o.backward(do)
    if "fwdbwd" in modes:
        res["fwdbwd"] = _bench(fwdbwd, device, grad_to_none=leaves)
    if "bwd" in modes:
        o, _ = fn(q, k, v, g)
        res["bwd"] = _bench(lambda: o.backward(do, retain_graph=True), device, grad_to_none=leaves)
        del o
    peak = None
    if device == "cuda" and "fwdbwd" in modes:
        for x in leaves:
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwdbwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return res, peak


def warm(shape, device="cuda"):
    """Runs every candidate's forward and backward once on ``shape``, filling Triton's
    on-disk compile cache (fla autotunes many configs); several shapes warm in parallel
    processes before a timed run."""
    for name, (fn, _) in candidates(device).items():
        if fn is None or name == "reference" or (name.startswith("sdpa") and shape[3] != shape[4]):
            continue
        try:
            q, k, v, g = make_inputs(*shape, device, requires_grad=_has_backward(name, device))
            o, _ = fn(q, k, v, g)
            if q.requires_grad:
                o.backward(torch.randn_like(o))
            torch.cuda.synchronize()
        except Exception as e:
            print(f"warm {shape} {name}: {str(e).splitlines()[0][:120]}")


# ----------------------------------------------------------------------------
# Accuracy against the float64 reference
# ----------------------------------------------------------------------------

def _rel(x, ref):
    x = x.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).norm() / ref.norm())


def accuracy(fn, device, shape=(2, 300, 2, 64, 64), gate="normal", grads=True, seed=1,
             dtype=torch.bfloat16):
    """Relative errors of o, the final state and (optionally) every gradient vs float64."""
    B, T, H, K, V = shape
    q, k, v, g = make_inputs(B, T, H, K, V, device, dtype=dtype, gate=gate, seed=seed)
    h0 = torch.randn(B, H, K, V, device=device)
    leaves = [x.detach().clone().requires_grad_(grads) for x in (q, k, v, g, h0)]
    o, ht = fn(*leaves[:4], h0=leaves[4], final=True)
    d = [x.detach().double() for x in (q, k, v, g, h0)]
    ref_o, ref_ht = reference.chunk_fwd(*d[:4], K ** -0.5, d[4], True, None)
    errs = {"o": _rel(o, ref_o)}
    if ht is not None:
        errs["ht"] = _rel(ht, ref_ht)
    if grads:
        do = torch.randn_like(o)
        dht = torch.randn_like(ref_ht).float()
        loss = (o.float() * do.float()).sum() + ((ht * dht).sum() if ht is not None else 0)
        loss.backward()
        ref_g = reference.chunk_bwd(*d[:4], K ** -0.5, d[4], None, do.double(), dht.double())
        for name, leaf, ref in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, ref_g):
            if leaf.grad is not None:
                errs[name] = _rel(leaf.grad, ref)
    return errs


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def _has_backward(name, device):
    """Whether one of our backends runs chunk_bwd on the benchmark's inputs (fla: yes)."""
    if name not in dispatch.BACKENDS:
        return True
    x = torch.empty(1, 1, 1, 64, device=device, dtype=torch.bfloat16)
    return dispatch.choose("chunk_bwd", x, x, x, x, backend=name).backend is not None


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def run(shapes, device, modes=MODES, out_dir=None, log=lambda *a: print(*a, flush=True)):
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": [], "accuracy": {}}
    bw = copy_bandwidth(device) if device == "cuda" else None
    results["copy_bandwidth_GBps"] = bw and bw / 1e9
    if bw:
        log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    cands = candidates(device)
    usable = {}  # name -> (fn, modes it can run)
    log("accuracy vs float64 reference (relative error norms), (2, 300, 2, 64, 64) bf16; "
        "then (2, 300, 2, 64, 64) with g ≈ -20")
    for name, (fn, why) in cands.items():
        if fn is None or name.startswith("sdpa"):
            if why:
                log(f"  {name:<11} skipped: {why}")
            if fn is not None:
                usable[name] = (fn, modes)
            continue
        has_bwd = _has_backward(name, device)
        try:
            errs = accuracy(fn, device, grads=has_bwd)
            strong = accuracy(fn, device, gate="strong", grads=False)
        except Exception as e:
            log(f"  {name:<11} cannot run: {str(e).splitlines()[0][:150]}")
            continue
        results["accuracy"][name] = {"normal": errs, "strong_gates": strong}
        worst = max(errs.values())
        ok = worst < 5e-2 and max(strong.values()) < 5e-2
        log(f"  {name:<11} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items())
            + " | g=-20: " + " ".join(f"{k}={v:.2e}" for k, v in strong.items())
            + ("" if ok else "  -> FAILS, not timed") + ("" if has_bwd else "  (forward only)"))
        if ok:
            usable[name] = (fn, modes if has_bwd else [m for m in modes if m == "fwd"])
    for shape in shapes:
        t0 = time.perf_counter()
        x = torch.empty(*shape[:4], device=device, dtype=torch.bfloat16)
        picks = {op: dispatch.choose(op, x, x, x, x).backend for op in ("chunk_fwd", "chunk_bwd")}
        del x
        log(f"\n(B, T, H, K, V) = {tuple(shape)}, bf16")
        log(f"{'backend':<11} {'mode':<7} {'ms':>8} {'vs fla':>7} {'vs cuDNN':>8} {'floor %':>7} "
            f"{'peak MiB':>9}   (first call s)")
        for name, (fn, cand_modes) in usable.items():
            B, T, H, K, V = shape
            if name.startswith("sdpa") and K != V:
                continue
            if name == "reference" and device == "cuda" and B * T * H > 2 ** 12:
                continue  # the reference is for small sizes
            t1 = time.perf_counter()
            try:
                times, peak = time_candidate(fn, shape, device, cand_modes)
            except Exception as e:
                log(f"{name:<11} failed: {str(e).splitlines()[0][:150]}")
                continue
            row = {"shape": shape, "backend": name, "ms": times, "peak_bytes": peak,
                   "seconds": time.perf_counter() - t1}
            results["rows"].append(row)
            _print_row(results, row, bw, log)
        # ratios against baselines measured after a row was printed
        _print_shape(results, shape, bw, log)
        log(f"auto ran chunk_fwd on {picks['chunk_fwd']}, chunk_bwd on {picks['chunk_bwd']}; "
            f"{time.perf_counter() - t0:.0f} s for this shape")
        if out_dir:  # after every shape: a run cut short keeps what it measured
            _save(results, out_dir)
    return results


def _save(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "bench.csv"), "w") as f:
        f.write("B,T,H,K,V,backend,mode,ms,peak_MiB\n")
        for r in results["rows"]:
            for mode, ms in r["ms"].items():
                peak = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else ""
                f.write(",".join(map(str, list(r["shape"]) + [r["backend"], mode, ms, peak])) + "\n")


def _print_row(results, r, bw, log, show_seconds=True):
    same = {x["backend"]: x for x in results["rows"] if tuple(x["shape"]) == tuple(r["shape"])}
    for mode, ms in r["ms"].items():
        fla = same.get("fla", {}).get("ms", {}).get(mode)
        cudnn = same.get("sdpa_cudnn", {}).get("ms", {}).get(mode)
        floor = floor_bytes(*r["shape"], mode) / bw * 1e3 if bw else None
        peak = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None and mode == "fwdbwd" else None
        log(f"{r['backend']:<11} {mode:<7} {ms:>8.3f} {_fmt(fla and fla / ms, '.2f'):>7} "
            f"{_fmt(cudnn and cudnn / ms, '.2f'):>8} {_fmt(floor and 100 * floor / ms, '.0f'):>7} "
            f"{_fmt(peak, '.0f'):>9}" + (f"   ({r['seconds']:.0f} s)" if show_seconds else ""))


def _print_shape(results, shape, bw, log):
    """The shape's table again, with every ratio (fla and cuDNN run after ours)."""
    log(f"summary {tuple(shape)}:")
    for r in results["rows"]:
        if tuple(r["shape"]) == tuple(shape):
            _print_row(results, r, bw, log, show_seconds=False)


def _shape(text):
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 5:
        raise argparse.ArgumentTypeError("a shape is B,T,H,K,V")
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape")
    p.add_argument("--shapes", type=_shape, nargs="+", help="B,T,H,K,V ...")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out", help="directory for bench.json and bench.csv")
    p.add_argument("--sweep", action="store_true",
                   help="T from 1024 to 32768 at 16384 tokens per batch, H=16, K=V=128")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                   help="PNG plots into --out (default: on when --out is given)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("no CUDA GPU: timing the reference on CPU shapes only")
    shapes = args.shapes or (CPU_SHAPES if device == "cpu" else QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.sweep:  # constant tokens per batch: linear attention's time should stay flat in T
        shapes = [(max(1, 16384 // T), T, 16, 128, 128) for T in (1024, 2048, 4096, 8192, 16384, 32768)]
    results = run(shapes, device, args.modes, args.out)
    if args.out and args.plots is not False:
        from gla_cuda import plots
        try:
            for path in plots.plot(results, args.out):
                print(f"plot: {path}")
        except ImportError as e:
            if args.plots:  # asked for explicitly: fail; by default only say why there are none
                raise
            print(f"no plots: {e}")
    elif args.plots:
        print("--plots needs --out DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
