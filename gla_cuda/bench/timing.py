"""Timing: do_bench wrappers, peak memory, host time per call, CUDA graphs; the warm-up
(compiling every candidate's kernels, in parallel processes) and the isolated accuracy check
in a child process (a candidate whose first call compiles for minutes cannot overrun a time
budget)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

from gla_cuda.bench.accuracy import accuracy, decode_accuracy
from gla_cuda.bench.cases import (DTYPES, accuracy_shape, candidates, decode_candidates, has_backward,
                                  head_dim_groups, qkvg)
from gla_cuda.bench.report import first_line


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


def _peak(fn, device):
    """Peak memory allocated during fn() above what was allocated before (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _host_ms(fn, device, grad_to_none=(), calls=10):
    """Host time of one call (CUDA only): the mean over calls queued without syncing. Where
    it reaches the GPU time, the timing is host-bound (launch overhead, not kernels)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        for x in grad_to_none:
            x.grad = None
        fn()
    ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return ms


def time_candidate(fn, shape, device, modes, dtype=torch.bfloat16):
    """({mode: ms}, {mode: peak bytes}, {mode: host ms per call}) for the training modes."""
    B, T, H, K, V = shape
    q, k, v, g = qkvg(B, T, H, K, V, device, dtype=dtype, requires_grad=True)
    leaves = [q, k, v, g]
    res, peak, host = {}, {}, {}

    def fwd():
        with torch.no_grad():
            fn(q, k, v, g)
    if "fwd" in modes:
        res["fwd"] = _bench(fwd, device)
        host["fwd"] = _host_ms(fwd, device)
        peak["fwd"] = _peak(fwd, device)
    do = torch.randn(B, T, H, V, device=device, dtype=dtype)

    def fwdbwd():
        o, _ = fn(q, k, v, g)
        o.backward(do)
    if "fwdbwd" in modes:
        res["fwdbwd"] = _bench(fwdbwd, device, grad_to_none=leaves)
        host["fwdbwd"] = _host_ms(fwdbwd, device, leaves)
        for x in leaves:
            x.grad = None
        peak["fwdbwd"] = _peak(fwdbwd, device)
    if "bwd" in modes:
        o, _ = fn(q, k, v, g)
        bwd = lambda: o.backward(do, retain_graph=True)  # noqa: E731
        res["bwd"] = _bench(bwd, device, grad_to_none=leaves)
        host["bwd"] = _host_ms(bwd, device, leaves)
        del o
    return res, peak, host


def time_decode(fn, shape, device, dtype=torch.bfloat16):
    """({"decode": ms, "graph": ms}, peak bytes) of one decode step of fn at shape (B, H, K, V).
    "decode" is an eager call, host overhead included when the host is slower than the GPU;
    "graph" is the step replayed from a CUDA graph (what a serving loop under CUDA graphs
    pays: GPU time alone), absent when the step cannot be captured."""
    B, H, K, V = shape
    q, k, v, g = qkvg(B, 1, H, K, V, device, dtype=dtype)
    h = torch.randn(B, H, K, V, device=device) * 0.1
    index = torch.arange(B, device=device, dtype=torch.int32)
    with torch.no_grad():
        step = lambda: fn(q, k, v, g, h, index)
        ms = {"decode": _bench(step, device)}
        if device == "cuda":
            try:
                ms["graph"] = _graph_ms(step, device)
            except Exception:  # e.g. a backend that synchronises
                torch.cuda.synchronize()
        return ms, _peak(step, device)


def _graph_ms(step, device, steps=20):
    """Per-step ms of ``steps`` calls captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            step()
    return _bench(graph.replay, device) / steps


def warm(shape, device="cuda", dtype="bf16", check=True, only=None, backward=True):
    """Makes every candidate's calls of a timed run once at ``shape``, filling Triton's on-disk
    compile cache (fla compiles every config it autotunes; Triton compiles per H, K, V, fla
    also per B and per initial state): the plain forward and backward, and with ``check`` the
    accuracy check's calls (``backward=False``: forwards only, for a run of --modes fwd). Several
    shapes warm in parallel processes (``--warm``); their autotune timings are not kept (they
    ran side by side), the timed run autotunes alone."""
    dt = DTYPES.get(dtype, dtype)
    for name, (fn, _) in candidates(device).items():
        if fn is None or name == "reference" or (name.startswith("sdpa") and shape[3] != shape[4]) or \
                (only is not None and name not in only):
            continue
        try:
            grads = backward and has_backward(name, device)
            q, k, v, g = qkvg(*shape, device, dtype=dt, requires_grad=grads)
            o, _ = fn(q, k, v, g)
            if grads:
                o.backward(torch.randn_like(o))
            if check and not name.startswith("sdpa"):
                accuracy(fn, device, accuracy_shape(shape), grads=grads, dtype=dt)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"warm {shape} {name}: {first_line(e)}")


def warm_decode(shape, device="cuda", dtype="bf16"):
    B, H, K, V = shape
    for name, fn in decode_candidates(device).items():
        try:
            q, k, v, g = qkvg(B, 1, H, K, V, device, dtype=DTYPES.get(dtype, dtype))
            fn(q, k, v, g, torch.zeros(B, H, K, V, device=device), torch.arange(B, device=device, dtype=torch.int32))
            decode_accuracy(fn, device, min(B, 8), H, K, V, dtype=DTYPES.get(dtype, dtype))
            torch.cuda.synchronize()
        except Exception as e:
            print(f"warm decode {shape} {name}: {first_line(e)}")


def warm_parallel(shapes, decode_shapes, dtypes, jobs=None, timeout_s=None, log=print):
    """Warms the shapes in parallel processes, ``jobs`` at a time (default: one per two CPU
    cores, at most 8): compiling is CPU-bound. First the first shape of each head dims (with
    the accuracy check's calls) and the decode shapes, then the other shapes (mostly cache
    hits by then). Processes still running after ``timeout_s`` (or when this one is stopped)
    are killed: none is left to compete with the timed run."""
    jobs = jobs or max(1, min(8, (os.cpu_count() or 2) // 2))
    groups = head_dim_groups(shapes)
    phases = [[("warm", s[0], d) for d in dtypes for s in groups.values()] +
              [("warm_decode", s, d) for d in dtypes for s in decode_shapes],
              [("warm", s, d, False) for d in dtypes for s in shapes if s not in [g[0] for g in groups.values()]]]
    t0, running = time.perf_counter(), []
    deadline = t0 + timeout_s if timeout_s else math.inf
    try:
        for todo in phases:
            for fn, shape, dtype, *check in todo:
                while len(running) >= jobs and time.perf_counter() < deadline:
                    time.sleep(0.2)
                    running = [p for p in running if p.poll() is None]
                if time.perf_counter() >= deadline:
                    break
                extra = ", check=False" if check else ""
                code = f"from gla_cuda.bench import timing; timing.{fn}({tuple(shape)!r}, dtype={dtype!r}{extra})"
                # side by side, their autotune timings are off: keep none of them
                env = dict(os.environ, TRITON_CACHE_AUTOTUNING="0")
                running.append(subprocess.Popen([sys.executable, "-c", code], env=env))
            while running and time.perf_counter() < deadline:  # a phase ends when all its processes do
                time.sleep(0.2)
                running = [p for p in running if p.poll() is None]
    finally:
        for p in running:
            p.kill()
            p.wait()
    left = " (timed out: killed what still ran)" if time.perf_counter() >= deadline else ""
    log(f"warm-up: {sum(map(len, phases))} shapes in {time.perf_counter() - t0:.0f} s, {jobs} processes{left}")


def child_check(name, shape, timed_shapes, dtype="bf16", grads=True):
    """In a child process (``start_child_check``): candidate ``name``'s accuracy check at shape,
    then one call of it on each timed shape, so that everything it compiles (and autotunes,
    with TRITON_CACHE_AUTOTUNING=1) is on disk for the parent. Returns the errors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn, dt = candidates(device)[name][0], DTYPES[dtype]
    grads = grads and has_backward(name, device)
    errs = accuracy(fn, device, tuple(shape), grads=grads, dtype=dt)
    strong = accuracy(fn, device, tuple(shape), gate="strong", grads=False, dtype=dt)
    for s in timed_shapes:
        warm(tuple(s), device, dtype, check=False, only=(name,), backward=grads)
    return {"errors": errs, "strong_gates": strong}


def start_child_check(name, shape, timed_shapes, dtype, grads=True):
    """child_check in a child process (collected by child_result): a candidate whose first call
    can compile for minutes (fla autotunes every configuration) cannot overrun --quick."""
    code = (f"import json; from gla_cuda.bench import timing; r = timing.child_check({name!r}, {tuple(shape)!r}, "
            f"{[tuple(s) for s in timed_shapes]!r}, {dtype!r}, {grads!r}); print('GLA_BENCH_RESULT ' + json.dumps(r))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def child_result(proc, timeout_s, started):
    """(errors, strong-gate errors) of a start_child_check process; killed after timeout_s more."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"its first call was still compiling after {time.perf_counter() - started:.0f} s "
                           "(once: Triton caches it; run again, or gla-bench --warm)") from None
    for line in stdout.splitlines():
        if line.startswith("GLA_BENCH_RESULT "):
            r = json.loads(line.split(" ", 1)[1])
            return r["errors"], r["strong_gates"]
    raise RuntimeError((stderr.strip().splitlines() or ["the child process printed no result"])[-1])
