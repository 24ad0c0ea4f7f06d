"""The benchmark: gla_cuda's backends side by side with fla and softmax attention.

    gla-bench                  # the sweep: T from 1K to 32K at 16K tokens per batch, for head dims
                               # 64, 128 and 256x512, bf16; then one decode step
    gla-bench --quick          # about a minute: one shape (8, 2048, 16, 128, 128), fwd, fwd+bwd, decode
    gla-bench --shapes 8,2048,16,128,128 2,8192,16,128,128 --modes fwd decode --dtypes bf16 fp16

Each backend is first checked against the float64 reference on a small case, per dtype
(o, final state and gradients; gates of -20 per step too); one that fails is not timed.
Then, per shape: forward, forward+backward and backward alone, as the median of
triton.testing.do_bench. The table gives ms, fla's time / ours and the best SDPA's time /
ours (> 1: faster), the fraction of the memory floor reached (the bytes that must move,
over the copy bandwidth measured in the same run), the peak memory allocated by the
call and (GPU) the host time per call, the mean of calls queued without syncing: "!" marks
a time the host needs 90% of or more, i.e. launch overhead rather than kernels. decode
times one recurrent step (T = 1) from a float32 state [B, H, K, V]; its floor is reading
and writing that state once plus q, k, v, g and o.

Candidates: ``auto`` (what a user gets), ``cuda``, ``triton``, ``reference`` (small sizes
only), ``fla`` when fla-core is importable, and SDPA flash / cuDNN (causal softmax
attention, same head dim). Without a GPU only the reference runs, on CPU-sized shapes.
Results go to --out (default ./bench_results): bench.json, bench.csv and PNG plots (time
vs T, one line per backend) when matplotlib is installed. A progress bar runs on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import torch

import gla_cuda
from gla_cuda import dispatch
from gla_cuda.backends import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwdbwd", "bwd", "decode")
TRAIN_MODES = ("fwd", "fwdbwd", "bwd")
QUICK_MODES = ("fwd", "fwdbwd", "decode")
MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward", "bwd": "backward", "decode": "decode step",
              "graph": "decode step in a CUDA graph"}

# The sweep: T from 1K to 32K at constant tokens per batch (B = max(1, TOKENS // T)), so a
# linear-time kernel's line stays flat while softmax attention's grows with T.
SWEEP_T = (1024, 2048, 4096, 8192, 16384, 32768)
TOKENS = 16384
HEAD_DIMS = {"64": (16, 64, 64), "128": (16, 128, 128), "256x512": (4, 256, 512)}  # name: H, K, V
QUICK_SHAPES = [(8, 2048, 16, 128, 128)]
CPU_SHAPES = [(1, 256, 2, 64, 64)]
DECODE_SHAPES = [(64, 16, 128, 128)]  # B, H, K, V: one token per sequence
QUICK_BUDGET_S = 50  # --quick stops starting measurements after this (imports and output come on top)
TIMING_RESERVE_S = 15  # under a budget, an isolated check (fla) leaves this much for the timings
REFERENCE_MAX_TOKENS = 4096  # B*T*H above which the reference is not timed on a GPU


def sweep_shapes(head_dims=tuple(HEAD_DIMS), tokens=TOKENS, seq_lens=SWEEP_T):
    return [(max(1, tokens // T), T, *HEAD_DIMS[hd]) for hd in head_dims for T in seq_lens]


# ----------------------------------------------------------------------------
# Candidates for fwd / fwdbwd / bwd: name -> fn(q, k, v, g, h0=None, final=False) -> (o, ht)
# ----------------------------------------------------------------------------

def _ours(backend):
    def run(q, k, v, g, h0=None, final=False):
        return gla_cuda.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=final, backend=backend)
    return run


def _fla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception as e:
        return None, f"fla not importable ({type(e).__name__}); pip install fla-core to compare"

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
    """name -> (fn or None, why not). Baselines first: every row of ours then prints its ratios."""
    if device != "cuda":
        return {"reference": (_ours("reference"), None)}
    out = {"sdpa_cudnn": (_sdpa("cudnn"), None), "sdpa_flash": (_sdpa("flash"), None), "fla": _fla(),
           "auto": (_ours(None), None)}  # auto: what a user gets, each op on its best backend
    for name in dispatch.BACKENDS:
        out[name] = (_ours(name), None)
    return out


# ----------------------------------------------------------------------------
# Decode candidates: name -> fn(q, k, v, g, state, index) -> (o, state after the step).
# q, k, v, g: [B, 1, H, *]; state: float32 [B, H, K, V] (a pooled op updates it in place);
# index: int32 arange(B), the pool slot of each row. One line adds a candidate.
# ----------------------------------------------------------------------------

def _decode_ours(backend):
    return lambda q, k, v, g, h, i: gla_cuda.fused_recurrent_gla(
        q, k, v, g, initial_state=h, output_final_state=True, backend=backend)


def _decode_pooled(backend):
    def run(q, k, v, g, h, i):
        if not hasattr(gla_cuda, "fused_recurrent_gla_pooled"):
            raise NotImplementedError("gla_cuda.fused_recurrent_gla_pooled does not exist yet")
        return gla_cuda.fused_recurrent_gla_pooled(q, k, v, g, h, i, check_index=False, backend=backend), h
    return run


def _decode_fla(q, k, v, g, h, i):
    from fla.ops.gla import fused_recurrent_gla
    return fused_recurrent_gla(q, k, v, gk=g, scale=q.shape[-1] ** -0.5, initial_state=h,
                               output_final_state=True)


DECODE_CANDIDATES = {
    "fla": _decode_fla,
    "auto": _decode_ours(None),
    "cuda": _decode_ours("cuda"),
    "triton": _decode_ours("triton"),
    "reference": _decode_ours("reference"),
    "cuda_pooled": _decode_pooled("cuda"),  # in place in a state pool (serving)
}


def decode_candidates(device):
    if device != "cuda":
        return {"reference": DECODE_CANDIDATES["reference"]}
    names = [n for n in DECODE_CANDIDATES
             if not (n.endswith("_pooled") and not hasattr(gla_cuda, "fused_recurrent_gla_pooled"))]
    return {n: DECODE_CANDIDATES[n] for n in names}


# ----------------------------------------------------------------------------
# Inputs, memory floor, timing
# ----------------------------------------------------------------------------

def make_inputs(B, T, H, K, V, device, dtype=torch.bfloat16, gate="normal", requires_grad=False, seed=0,
                g_dtype=None):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.float32, generator=gen)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = torch.nn.functional.logsigmoid(r(B, T, H, K)) / 16 if gate == "normal" else -20 - r(B, T, H, K).abs()
    return [x.to(dt).requires_grad_(requires_grad) for x, dt in zip((q, k, v, g), (dtype,) * 3 + (g_dtype or dtype,))]


def floor_bytes(B, T, H, K, V, mode, itemsize=2):
    """Bytes that must move. fwd reads q, k, v, g and writes o; bwd reads q, k, v, g, do and
    writes dq, dk, dv, dg; decode (T = 1; "graph": the same step in a CUDA graph) also reads
    and writes the float32 state once."""
    mode = "decode" if mode == "graph" else mode
    per = {"fwd": 3 * K + 2 * V, "bwd": 6 * K + 3 * V, "fwdbwd": 9 * K + 5 * V, "decode": 3 * K + 2 * V}[mode]
    state = 2 * B * H * K * V * 4 if mode == "decode" else 0
    return B * T * H * per * itemsize + state


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
    q, k, v, g = make_inputs(B, T, H, K, V, device, dtype=dtype, requires_grad=True)
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
    q, k, v, g = make_inputs(B, 1, H, K, V, device, dtype=dtype)
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
            grads = backward and _has_backward(name, device)
            q, k, v, g = make_inputs(*shape, device, dtype=dt, requires_grad=grads)
            o, _ = fn(q, k, v, g)
            if grads:
                o.backward(torch.randn_like(o))
            if check and not name.startswith("sdpa"):
                accuracy(fn, device, accuracy_shape(shape), grads=grads, dtype=dt)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"warm {shape} {name}: {_first_line(e)}")


def warm_decode(shape, device="cuda", dtype="bf16"):
    B, H, K, V = shape
    for name, fn in decode_candidates(device).items():
        try:
            q, k, v, g = make_inputs(B, 1, H, K, V, device, dtype=DTYPES.get(dtype, dtype))
            fn(q, k, v, g, torch.zeros(B, H, K, V, device=device), torch.arange(B, device=device, dtype=torch.int32))
            decode_accuracy(fn, device, min(B, 8), H, K, V, dtype=DTYPES.get(dtype, dtype))
            torch.cuda.synchronize()
        except Exception as e:
            print(f"warm decode {shape} {name}: {_first_line(e)}")


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
                code = f"from gla_cuda import bench; bench.{fn}({tuple(shape)!r}, dtype={dtype!r}{extra})"
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


# ----------------------------------------------------------------------------
# Accuracy against the float64 reference
# ----------------------------------------------------------------------------

def _rel(x, ref):
    x = x.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).norm() / ref.norm())


ACCURACY_T = 272  # 4 chunks of 64 and a partial one; a multiple of 16, as the timed T are


def accuracy_shape(shape):
    """The accuracy check of a timed shape: its B, H, K, V (Triton compiles per H, K, V and, in
    fla, per B: the check then shares the timed run's compiled kernels), T = ACCURACY_T."""
    B, T, H, K, V = shape
    return (B, ACCURACY_T, H, K, V)


def head_dim_groups(shapes):
    """(H, K, V) -> the shapes that have them, in order."""
    groups = {}
    for s in shapes:
        groups.setdefault(tuple(s[2:]), []).append(tuple(s))
    return groups


def accuracy(fn, device, shape=(2, 300, 2, 64, 64), gate="normal", grads=True, seed=1,
             dtype=torch.bfloat16, g_dtype=None):
    """Relative errors of o, the final state and (optionally) every gradient vs float64 (g in
    g_dtype, default dtype)."""
    B, T, H, K, V = shape
    q, k, v, g = make_inputs(B, T, H, K, V, device, dtype=dtype, gate=gate, seed=seed, g_dtype=g_dtype)
    h0 = torch.randn(B, H, K, V, device=device)
    leaves = [x.detach().clone().requires_grad_(grads) for x in (q, k, v, g, h0)]
    o, ht = fn(*leaves[:4], h0=leaves[4], final=True)
    d = [x.detach().double() for x in (q, k, v, g, h0)]
    ref_o, ref_ht = reference.chunk_fwd(*d[:4], K ** -0.5, d[4], True, None)
    errs = {"o": _rel(o, ref_o)}
    if ht is not None:
        errs["ht"] = _rel(ht, ref_ht)
    if grads:
        # the inference forward too (no graph: no intermediates kept, a kernel of its own on sm_90)
        with torch.no_grad():
            o_i, ht_i = fn(*leaves[:4], h0=leaves[4], final=True)
        errs["o_nograd"] = _rel(o_i, ref_o)
        if ht_i is not None:
            errs["ht_nograd"] = _rel(ht_i, ref_ht)
        do = torch.randn_like(o)
        dht = torch.randn_like(ref_ht).float()
        loss = (o.float() * do.float()).sum() + ((ht * dht).sum() if ht is not None else 0)
        loss.backward()
        ref_g = reference.chunk_bwd(*d[:4], K ** -0.5, d[4], None, do.double(), dht.double())
        for name, leaf, ref in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, ref_g):
            if leaf.grad is not None:
                errs[name] = _rel(leaf.grad, ref)
    return errs


def decode_accuracy(fn, device, B=8, H=4, K=128, V=128, dtype=torch.bfloat16, gate="normal", seed=2):
    """Relative errors of o and of the state after one step vs float64."""
    q, k, v, g = make_inputs(B, 1, H, K, V, device, dtype=dtype, gate=gate, seed=seed)
    h0 = torch.randn(B, H, K, V, device=device)
    with torch.no_grad():
        o, ht = fn(q, k, v, g, h0.clone(), torch.arange(B, device=device, dtype=torch.int32))
    if ht is None:
        raise RuntimeError("returned no state")
    ref_o, ref_ht = reference.naive_fwd(*(x.double() for x in (q, k, v, g)), K ** -0.5, h0.double(), True)
    return {"o": _rel(o, ref_o), "ht": _rel(ht, ref_ht)}


def child_check(name, shape, timed_shapes, dtype="bf16", grads=True):
    """In a child process (``_check_in_child``): candidate ``name``'s accuracy check at shape,
    then one call of it on each timed shape, so that everything it compiles (and autotunes,
    with TRITON_CACHE_AUTOTUNING=1) is on disk for the parent. Returns the errors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn, dt = candidates(device)[name][0], DTYPES[dtype]
    grads = grads and _has_backward(name, device)
    errs = accuracy(fn, device, tuple(shape), grads=grads, dtype=dt)
    strong = accuracy(fn, device, tuple(shape), gate="strong", grads=False, dtype=dt)
    for s in timed_shapes:
        warm(tuple(s), device, dtype, check=False, only=(name,), backward=grads)
    return {"errors": errs, "strong_gates": strong}


def _start_child_check(name, shape, timed_shapes, dtype, grads=True):
    """child_check in a child process (collected by _child_result): a candidate whose first call
    can compile for minutes (fla autotunes every configuration) cannot overrun --quick."""
    code = (f"import json; from gla_cuda import bench; r = bench.child_check({name!r}, {tuple(shape)!r}, "
            f"{[tuple(s) for s in timed_shapes]!r}, {dtype!r}, {grads!r}); print('GLA_BENCH_RESULT ' + json.dumps(r))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _child_result(proc, timeout_s, started):
    """(errors, strong-gate errors) of a _start_child_check process; killed after timeout_s more."""
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


def _tolerance(dtype):
    return 1e-2 if dtype == torch.float32 else 5e-2  # fp32 may use TF32 products on the GPU


# ----------------------------------------------------------------------------
# Progress bar
# ----------------------------------------------------------------------------

class Progress:
    """A one-line bar on stderr: steps done of the total, what runs now, time spent and an
    estimate of what is left. It is redrawn in place, so by default it is drawn only when
    stderr is a terminal (a log file gets the table alone). ``write`` prints a line of the
    table (stdout) above it."""

    def __init__(self, total, enabled=None, stream=None, width=24):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.width = max(1, total), 0, width
        self.label, self.t0, self._len = "", time.perf_counter(), 0

    def _clear(self):
        if self.enabled and self._len:
            self.stream.write("\r" + " " * self._len + "\r")
            self.stream.flush()
            self._len = 0

    def _draw(self):
        if not self.enabled:
            return
        frac = min(1.0, self.done / self.total)
        fill = int(round(frac * self.width))
        spent = time.perf_counter() - self.t0
        left = f", ~{_clock(spent / self.done * (self.total - self.done))} left" if 0 < self.done < self.total else ""
        text = (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} {_clock(spent)}{left}"
                f"  {self.label}")[:max(40, _columns() - 1)]
        self.stream.write("\r" + text + " " * max(0, self._len - len(text)))
        self.stream.flush()
        self._len = len(text)

    def start(self, label):
        self.label = label
        self._draw()

    def advance(self, n=1):
        self.done += n
        self._draw()

    def write(self, line=""):
        self._clear()
        print(line, flush=True)
        self._draw()

    def close(self):
        self._clear()


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _columns():
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or 100  # 0: a pseudo-terminal without a size
    except (OSError, ValueError, AttributeError):
        return 100


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def _has_backward(name, device):
    """Whether one of our backends runs chunk_bwd on the benchmark's inputs (fla: yes)."""
    if name not in dispatch.BACKENDS:
        return True
    x = torch.empty(1, 1, 1, 64, device=device, dtype=torch.bfloat16)
    return dispatch.choose("chunk_bwd", x, x, x, x, backend=name).backend is not None


def _first_line(e):
    text = str(e).strip()
    if text.startswith("gla_cuda: cannot run"):  # the dispatcher's table: keep the reason itself
        reasons = [l.strip() for l in text.splitlines()[2:] if l.strip() and "available" not in l]
        text = text.splitlines()[0] + (" (" + "; ".join(reasons) + ")" if reasons else "")
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def _dtype_name(dtype):
    return next(n for n, d in DTYPES.items() if d == dtype)


def derived(results, row):
    """{mode: {"vs_fla", "vs_sdpa", "floor"}} for one row: fla's ms / ours, the best SDPA's
    ms / ours and floor ms / ours, from rows of the same shape and dtype (None if missing)."""
    same = {r["backend"]: r for r in results["rows"]
            if tuple(r["shape"]) == tuple(row["shape"]) and r["dtype"] == row["dtype"]}
    bw = results.get("copy_bandwidth_GBps")
    itemsize = DTYPES[row["dtype"]].itemsize
    out = {}
    for mode, ms in row["ms"].items():
        fla = same.get("fla", {}).get("ms", {}).get(mode)
        sdpa = [same[n]["ms"][mode] for n in ("sdpa_flash", "sdpa_cudnn") if mode in same.get(n, {}).get("ms", {})]
        floor = floor_bytes(*row["shape"], mode, itemsize) / (bw * 1e9) * 1e3 if bw else None
        out[mode] = {"vs_fla": fla / ms if fla else None, "vs_sdpa": min(sdpa) / ms if sdpa else None,
                     "floor": floor / ms if floor else None}
    return out


def _row_line(results, r, mode):
    d = derived(results, r)[mode]
    peak = (r.get("peak_bytes") or {}).get(mode)
    host = (r.get("host_ms") or {}).get(mode)
    # "!": the host needs at least 90% of the measured time per call, so the time is
    # (nearly) host-bound and moves with host speed
    bound = "!" if host is not None and host >= 0.9 * r["ms"][mode] else " "
    return (f"{r['backend']:<11} {mode:<7} {r['ms'][mode]:>9.3f} {_fmt(d['vs_fla'], '.2f'):>7} "
            f"{_fmt(d['vs_sdpa'], '.2f'):>8} {_fmt(d['floor'] and 100 * d['floor'], '.0f'):>7} "
            f"{_fmt(peak and peak / 2**20, '.0f'):>9} {_fmt(host):>8}{bound}")


HEADER = (f"{'backend':<11} {'mode':<7} {'ms':>9} {'vs fla':>7} {'vs SDPA':>8} {'floor %':>7} {'peak MiB':>9} "
          f"{'host ms':>8}")


def run(shapes, device, modes=MODES, out_dir=None, log=None, dtypes=("bf16",), decode_shapes=None,
        budget_s=None, progress=None, isolate=None):
    """Checks, then times every candidate; returns the results dict (also saved to out_dir
    after every shape, so a run cut short keeps what it measured). budget_s: no measurement
    starts after that many seconds (those left are listed as skipped). isolate: candidates
    whose check runs in a child process killed when the budget runs out (default with a
    budget: fla, whose first run compiles for minutes)."""
    if isolate is None:
        isolate = ("fla",) if budget_s is not None else ()
    t_start = time.perf_counter()
    dtypes = [d if isinstance(d, str) else _dtype_name(d) for d in dtypes]
    train_modes = [m for m in modes if m in TRAIN_MODES]
    decode_shapes = (DECODE_SHAPES if decode_shapes is None else decode_shapes) if "decode" in modes else []
    shapes = shapes if train_modes else []
    cands = candidates(device) if shapes else {}
    dcands = decode_candidates(device) if decode_shapes else {}
    groups = head_dim_groups(shapes)
    total = len(dtypes) * (len(cands) * (len(groups) + len(shapes)) + len(dcands) * 2 * len(decode_shapes))
    bar = progress or Progress(total, enabled=False)
    bar.total = max(1, total)
    log = log or bar.write
    versions = {"torch": torch.__version__, "gla_cuda": gla_cuda.__version__}
    for mod in ("triton", "fla"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "versions": versions, "rows": [], "accuracy": [],
               "skipped": [], "torch": torch.__version__}
    bw = copy_bandwidth(device) if device == "cuda" else None
    results["copy_bandwidth_GBps"] = bw and bw / 1e9
    if bw:
        log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write): the memory floor's speed")

    def over_budget(what):
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            results["skipped"].append(what)
            return True
        return False

    for dname in dtypes:
        dtype = DTYPES[dname]
        # decode first: it takes seconds, so a time budget never cuts it
        _decode(dcands, decode_shapes, device, dtype, dname, results, log, bar, over_budget)
        usable_by = {}  # (H, K, V) -> {name: fn} of the candidates that passed there
        for shape in shapes:
            if tuple(shape[2:]) not in usable_by:  # the first shape of its head dims: check first
                usable_by[tuple(shape[2:])] = _check(
                    cands, device, dtype, dname, results, log, bar, over_budget, accuracy_shape(shape),
                    groups[tuple(shape[2:])], isolate,
                    lambda: 3600.0 if budget_s is None else
                    budget_s - TIMING_RESERVE_S - (time.perf_counter() - t_start), grads=train_modes != ["fwd"])
            usable = usable_by[tuple(shape[2:])]
            t0 = time.perf_counter()
            B, T, H, K, V = shape
            floors = "; ".join(f"{m} {floor_bytes(*shape, m, dtype.itemsize) / bw * 1e3:.3f} ms"
                               for m in train_modes) if bw else "no GPU: no floor"
            log(f"\n(B, T, H, K, V) = {tuple(shape)}, {dname}; memory floor {floors}")
            log(HEADER)
            for name in cands:
                bar.start(f"{shape} {dname} {name}")
                if name not in usable or (name.startswith("sdpa") and K != V) or \
                        (name == "reference" and device == "cuda" and B * T * H > REFERENCE_MAX_TOKENS) or \
                        over_budget(f"{name} {shape} {dname}"):
                    bar.advance()
                    continue
                t1 = time.perf_counter()
                try:
                    times, peak, host = time_candidate(usable[name], shape, device,
                                                       usable_modes(name, device, train_modes), dtype)
                except Exception as e:
                    log(f"{name:<11} failed: {_first_line(e)}")
                    bar.advance()
                    continue
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                row = {"shape": list(shape), "dtype": dname, "backend": name, "ms": times, "peak_bytes": peak,
                       "host_ms": host, "seconds": time.perf_counter() - t1}
                results["rows"].append(row)
                for mode in times:
                    log(_row_line(results, row, mode))
                bar.advance()
            if device == "cuda":
                x = torch.empty(B, T, H, K, device=device, dtype=dtype)
                picks = {op: dispatch.choose(op, x, x, x, x).backend for op in ("chunk_fwd", "chunk_bwd")}
                saver = dispatch.saving_backend(x, x, x, x)
                del x
                train = (f"the {saver} forward keeping its intermediates for the backward" if saver
                         else f"chunk_fwd on {picks['chunk_fwd']}")
                log(f"auto ran chunk_fwd on {picks['chunk_fwd']}, chunk_bwd on {picks['chunk_bwd']}; "
                    f"fwd+bwd (training) ran {train}; {time.perf_counter() - t0:.0f} s for this shape")
            if out_dir:
                save(results, out_dir)
        if out_dir:
            save(results, out_dir)
    if results["skipped"]:
        log(f"\n{len(results['skipped'])} measurements not started: the time budget ({budget_s} s) ran out "
            f"(run without --quick for all): " + ", ".join(results["skipped"][:6])
            + (" ..." if len(results["skipped"]) > 6 else ""))
    results["seconds"] = time.perf_counter() - t_start
    return results


def usable_modes(name, device, modes):
    return modes if _has_backward(name, device) else [m for m in modes if m == "fwd"]


def _check(cands, device, dtype, dname, results, log, bar, over_budget, shape, timed_shapes=(), isolate=(),
           time_left=None, grads=True):
    """Accuracy of every GLA candidate in dtype at shape; returns {name: fn} of those that pass
    (grads: with the gradients, for runs that time a backward).
    Candidates in ``isolate`` are checked (and their timed shapes compiled) in a child process
    started first, so it compiles while the others are checked, and collected last: it is killed
    once time_left() runs out."""
    usable = {}
    if not cands:
        return usable
    tol = _tolerance(dtype)
    log(f"\naccuracy vs the float64 reference, {dname}, (B, T, H, K, V) = {shape}: relative error norms (o_nograd, "
        f"ht_nograd: the inference forward), then with gates of -20 per step (inference); above {tol:g} fails and is not timed")
    started = time.perf_counter()
    children = {name: _start_child_check(name, shape, timed_shapes, dname, grads) for name in isolate
                if cands.get(name, (None,))[0] is not None and not over_budget(f"accuracy {name} {dname}")}
    try:
        for name in [n for n in cands if n not in children] + list(children):
            fn, why = cands[name]
            bar.start(f"accuracy {dname} {name}")
            if fn is None:
                log(f"  {name:<11} skipped: {why}")
            elif name.startswith("sdpa"):
                try:  # softmax attention: a different function, nothing to compare; can it run at all?
                    q = make_inputs(1, 128, 1, shape[3], shape[3], device, dtype=dtype)[0]
                    fn(q, q, q, q)
                    usable[name] = fn
                    log(f"  {name:<11} softmax attention (the baseline): no accuracy check")
                except Exception as e:
                    log(f"  {name:<11} cannot run {dname}: {_first_line(e)}")
            elif name in children or not over_budget(f"accuracy {name} {dname}"):
                has_bwd = grads and _has_backward(name, device)
                try:
                    if name in children:
                        errs, strong = _child_result(children.pop(name), max(1.0, time_left()), started)
                    else:
                        errs = accuracy(fn, device, shape, grads=has_bwd, dtype=dtype)
                        strong = accuracy(fn, device, shape, gate="strong", grads=False, dtype=dtype)
                except Exception as e:
                    log(f"  {name:<11} cannot run: {_first_line(e)}")
                else:
                    ok = max(errs.values()) < tol and max(strong.values()) < tol
                    results["accuracy"].append({"backend": name, "dtype": dname, "op": "chunk", "shape": list(shape),
                                                "errors": errs, "strong_gates": strong, "ok": ok})
                    log(f"  {name:<11} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                        + " | g=-20: " + " ".join(f"{k}={v:.1e}" for k, v in strong.items())
                        + ("" if ok else "  -> FAILS, not timed") + ("" if has_bwd else "  (forward only)"))
                    if ok:
                        usable[name] = fn
            bar.advance()
    finally:
        for proc in children.values():  # any left: the others failed in between
            proc.kill()
            proc.communicate()
    return usable


def _decode(dcands, decode_shapes, device, dtype, dname, results, log, bar, over_budget):
    if not decode_shapes:
        return
    tol = _tolerance(dtype)
    bw = results["copy_bandwidth_GBps"]
    for B, H, K, V in decode_shapes:
        usable, check = {}, (min(B, 8), H, K, V)
        log(f"\ndecode: one step from a float32 state, {dname} q/k/v/g; accuracy vs float64 at (B, H, K, V) = "
            f"{check}, o and the state after the step")
        for name, fn in dcands.items():
            bar.start(f"decode accuracy {dname} {name}")
            if not over_budget(f"decode accuracy {name} {dname}"):
                try:
                    errs = decode_accuracy(fn, device, *check, dtype=dtype)
                except Exception as e:
                    log(f"  {name:<11} cannot run: {_first_line(e)}")
                else:
                    ok = max(errs.values()) < tol
                    results["accuracy"].append({"backend": name, "dtype": dname, "op": "decode", "shape": list(check),
                                                "errors": errs, "ok": ok})
                    log(f"  {name:<11} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                        + ("" if ok else "  -> FAILS, not timed"))
                    if ok:
                        usable[name] = fn
            bar.advance()
        shape = (B, 1, H, K, V)
        floor = floor_bytes(*shape, "decode", dtype.itemsize)
        state = B * H * K * V * 4
        log(f"\ndecode step (B, H, K, V) = {(B, H, K, V)}, {dname}, float32 state of "
            + (f"{state / 2**20:.0f} MiB" if state >= 2**20 else f"{state / 2**10:.0f} KiB")
            + " read and written; memory floor " + (f"{floor / (bw * 1e9) * 1e3:.4f} ms" if bw else "— (no GPU)"))
        log(HEADER)
        for name, fn in dcands.items():
            bar.start(f"decode {(B, H, K, V)} {dname} {name}")
            if name in usable and not over_budget(f"decode {name} {(B, H, K, V)} {dname}"):
                try:
                    ms, peak = time_decode(fn, (B, H, K, V), device, dtype)
                except Exception as e:
                    log(f"{name:<11} failed: {_first_line(e)}")
                else:
                    row = {"shape": list(shape), "dtype": dname, "backend": name, "ms": ms,
                           "peak_bytes": {"decode": peak}, "seconds": None}
                    results["rows"].append(row)
                    for mode in ms:
                        log(_row_line(results, row, mode))
            bar.advance()


CSV_COLUMNS = ("mode", "dtype", "B", "T", "H", "K", "V", "backend", "ms", "vs_fla", "vs_sdpa", "floor_fraction",
               "peak_MiB", "host_ms")


def save(results, out_dir):
    """bench.json (everything, with the ratios) and bench.csv (one line per row and mode)."""
    os.makedirs(out_dir, exist_ok=True)
    for r in results["rows"]:
        r["derived"] = derived(results, r)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "bench.csv"), "w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for r in results["rows"]:
            for mode, ms in r["ms"].items():
                d, peak = r["derived"][mode], (r.get("peak_bytes") or {}).get(mode)
                host = (r.get("host_ms") or {}).get(mode)
                cells = [mode, r["dtype"], *r["shape"], r["backend"], f"{ms:.5g}"] + \
                        ["" if d[x] is None else f"{d[x]:.4g}" for x in ("vs_fla", "vs_sdpa", "floor")] + \
                        ["" if peak is None else f"{peak / 2**20:.1f}", "" if host is None else f"{host:.4g}"]
                f.write(",".join(map(str, cells)) + "\n")
    return [os.path.join(out_dir, n) for n in ("bench.json", "bench.csv")]


def _shape(text):
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 5:
        raise argparse.ArgumentTypeError("a shape is B,T,H,K,V")
    return parts


def _decode_shape(text):
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("a decode shape is B,H,K,V")
    return parts


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gla-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"about a minute: {QUICK_SHAPES[0]}, modes {' '.join(QUICK_MODES)}, "
                        f"no measurement started after {QUICK_BUDGET_S} s")
    p.add_argument("--shapes", type=_shape, nargs="+", metavar="B,T,H,K,V", help="instead of the sweep")
    p.add_argument("--sweep", action="store_true", help="the sweep (the default without --shapes or --quick)")
    p.add_argument("--head-dims", nargs="+", choices=list(HEAD_DIMS), default=list(HEAD_DIMS),
                   help="the sweep's (H, K, V): 64 = (16, 64, 64), 128 = (16, 128, 128), 256x512 = (4, 256, 512)")
    p.add_argument("--tokens", type=int, default=TOKENS, help="the sweep's tokens per batch (B * T)")
    p.add_argument("--modes", nargs="+", choices=MODES, help=f"default: all; --quick: {' '.join(QUICK_MODES)}")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"], help="q, k, v, g dtypes")
    p.add_argument("--decode-shapes", type=_decode_shape, nargs="+", metavar="B,H,K,V", default=DECODE_SHAPES)
    p.add_argument("--out", default="bench_results", help="directory for bench.json, bench.csv and the plots")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                   help="PNG plots into --out (default: on when matplotlib is installed)")
    p.add_argument("--budget", type=float, help="seconds after which no measurement starts "
                   f"(--quick: {QUICK_BUDGET_S})")
    p.add_argument("--warm", action="store_true",
                   help="compile the kernels of every head dims in parallel processes first (fla compiles "
                        "many configs to autotune: minutes for a first run of the sweep)")
    p.add_argument("--warm-only", action="store_true", help="--warm, then stop")
    p.add_argument("--warm-timeout", type=float, help="seconds the warm-up may take (default: no limit)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--threads", type=int, help="torch CPU threads (CPU runs; default 1: the shapes are small)")
    return p.parse_args(argv)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    # Keep the timed process's autotuning results on disk: the next run skips fla's autotuning.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = args.modes or list(QUICK_MODES if args.quick else MODES)
    budget = args.budget if args.budget is not None else (QUICK_BUDGET_S if args.quick else None)
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
        shapes = args.shapes or CPU_SHAPES
        print("no CUDA GPU: timing only the PyTorch reference, on CPU-sized shapes "
              f"{', '.join(map(str, shapes))} (the GPU backends, fla and SDPA need a GPU)", flush=True)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        shapes = args.shapes or (QUICK_SHAPES if args.quick else sweep_shapes(args.head_dims, args.tokens))
    # stopped (timeout, kill): leave through the finally blocks (warm-up processes, the bar)
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _main(args, device, modes, budget, shapes, t_start)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args, device, modes, budget, shapes, t_start):
    decode_shapes = args.decode_shapes
    if (args.warm or args.warm_only) and device == "cuda":
        warm_parallel(shapes if any(m in TRAIN_MODES for m in modes) else [],
                      decode_shapes if "decode" in modes else [], args.dtypes, timeout_s=args.warm_timeout)
    if args.warm_only:
        return 0
    bar = Progress(1, enabled=args.progress)  # run() sets the total
    try:
        results = run(shapes, device, modes, args.out, dtypes=args.dtypes, decode_shapes=decode_shapes,
                      budget_s=budget, progress=bar)
    finally:
        bar.close()
    written = save(results, args.out) if args.out else []
    if args.out and args.plots is not False:
        from gla_cuda import plots
        try:
            written += plots.plot(results, args.out)
        except ImportError as e:
            if args.plots:  # asked for explicitly: fail; by default only say why there are none
                raise
            print(f"no plots: {e}")
    elif args.plots:
        print("--plots needs --out DIR")
    if written:
        print(f"\nwrote {', '.join(written)}")
    print(f"{time.perf_counter() - t_start:.0f} s in all" + (" (--quick)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
