"""Property-based tests: every op on every backend that runs here, against the float64
oracle, over drawn shapes (sizes of 0 and 1, K and V not powers of two), dtypes, strided
views of every input, packed layouts (empty, one-token and one-chunk sequences), gates
(0, ordinary, -20 per step, -inf, mixes), optional arguments and the backward.

The hypothesis profile is fixed (derandomized, few examples, no deadline), so a CI run is
reproducible; a failure prints the drawn case. Each defect these properties found has a
named test in test_regressions.py. Containment (a NaN or inf in one sequence leaves the
others bitwise unchanged) and the empty sizes are checked case by case below.
"""
import math
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st

import gla_cuda
from conftest import HAS_CUDA, TOL, oracle, rel_err

_WANTED = os.environ.get("GLA_TEST_DEVICES", "cpu,cuda").split(",")


@dataclass(frozen=True)
class Target:
    """A backend on a device, with the sizes worth drawing for it (the interpreter is slow,
    the compiled chunked kernels take K in {64, 128, 256} and V a multiple of 64)."""
    backend: str
    device: str
    examples: int
    dtypes: tuple
    chunk_K: tuple = (1, 3, 5, 12, 16)
    chunk_V: tuple = (1, 3, 7, 10, 16)
    rec_K: tuple = (1, 3, 5, 12, 16)
    rec_V: tuple = (1, 3, 7, 10, 16)
    max_T_chunk: int = 140
    max_T_rec: int = 80
    max_T_rec_bwd: int = 80
    pooled: bool = True
    shrink: bool = True           # off where each example takes seconds (the interpreter)

    def __str__(self):
        return f"{self.backend}-{self.device}"


_HALF = (torch.float32, torch.bfloat16, torch.float16)
TARGETS = []
if "cpu" in _WANTED:
    TARGETS.append(Target("reference", "cpu", 100, (torch.float64,) + _HALF))
    if not HAS_CUDA:  # Triton runs CPU tensors under TRITON_INTERPRET=1 (set by conftest)
        TARGETS.append(Target("triton", "cpu", 40, _HALF, max_T_chunk=70, max_T_rec=10,
                              max_T_rec_bwd=10, pooled=False, shrink=False))
if HAS_CUDA and "cuda" in _WANTED:
    TARGETS.append(Target("triton", "cuda", 60, _HALF, chunk_K=(1, 3, 12, 64, 100), chunk_V=(1, 7, 64, 136),
                          rec_K=(1, 3, 12, 64, 100), rec_V=(1, 7, 64, 136), max_T_chunk=300,
                          max_T_rec=300, max_T_rec_bwd=300, pooled=False))
    TARGETS.append(Target("cuda", "cuda", 60, (torch.bfloat16, torch.float16), chunk_K=(64, 128),
                          chunk_V=(64, 128), rec_K=(1, 3, 12, 64, 100), rec_V=(1, 7, 64, 136),
                          max_T_chunk=300, max_T_rec=300, max_T_rec_bwd=16))

PARAMS = [pytest.param(t, id=str(t)) for t in TARGETS]


def profile(target):
    phases = [p for p in Phase if p != Phase.shrink or target.shrink]
    return settings(max_examples=target.examples, derandomize=True, deadline=None, print_blob=True,
                    phases=phases, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------
# Drawn cases
# ----------------------------------------------------------------------------

# Hypothesis starts from the first element of a list: the ordinary values come first, the
# sizes of 0 last (test_empty_sizes covers them case by case too).
GATES = ("normal", "neginf", "mix", "strong", "zero")
VIEWS = ("contiguous", "transposed", "sliced", "offset")


@dataclass
class Case:
    op: str                      # chunk | recurrent
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype
    g_dtype: torch.dtype
    gate: str
    lengths: tuple = None        # packed sequences (B = 1, T = sum) or None
    h0: bool = False
    final: bool = True
    scale: float = None
    views: dict = field(default_factory=dict)
    backward: bool = True
    seed: int = 0

    @property
    def N(self):
        return self.B if self.lengths is None else len(self.lengths)


def _sizes(draw, target, op, backward):
    K = draw(st.sampled_from((target.chunk_K if op == "chunk" else target.rec_K)[::-1]))
    V = draw(st.sampled_from((target.chunk_V if op == "chunk" else target.rec_V)[::-1] + (0,)))
    max_T = target.max_T_chunk if op == "chunk" else (target.max_T_rec_bwd if backward else target.max_T_rec)
    H = draw(st.sampled_from((2, 1, 3, 0)))
    return K, V, H, max_T


@st.composite
def cases(draw, target):
    op = draw(st.sampled_from(("chunk", "recurrent")))
    backward = not (draw(st.booleans()) and draw(st.booleans()))  # 3 in 4
    K, V, H, max_T = _sizes(draw, target, op, backward)
    lengths = None
    if not draw(st.booleans()):
        pick = st.sampled_from([n for n in (5, 64, 1, 0, 65, 2, 63) if n <= max_T])
        lengths = tuple(draw(st.lists(pick, min_size=1, max_size=4)))
        if draw(st.integers(0, 9)) == 9:
            lengths = ()  # no sequence at all: cu_seqlens = [0]
        while sum(lengths) > max_T:
            lengths = lengths[:-1]
        B, T = 1, sum(lengths)
    else:
        B = draw(st.sampled_from((2, 1, 3, 0)))
        T = draw(st.sampled_from([n for n in (65, 7, 1, 64, 130, 2, 63, 0) if n <= max_T]))
    dtype = draw(st.sampled_from(target.dtypes))
    gate = draw(st.sampled_from(GATES))
    # float16 gradients of strong gates (|dg| ~ 1e-8) have no float16 value: g is float32
    # there, as float16 training keeps it
    g_f32 = dtype == torch.float16 and gate in ("strong", "mix")
    g_dtype = torch.float32 if g_f32 else draw(st.sampled_from((torch.float32, dtype)))
    views = {name: draw(st.sampled_from(VIEWS)) for name in ("q", "k", "v", "g")}
    h0 = not draw(st.booleans())
    if h0:
        views["initial_state"] = draw(st.sampled_from(("contiguous", "transposed")))
    return Case(op=op, B=B, T=T, H=H, K=K, V=V, dtype=dtype, g_dtype=g_dtype, gate=gate, lengths=lengths,
                h0=h0, final=not draw(st.booleans()), scale=draw(st.sampled_from((None, 0.3, 1.0, -0.7))),
                views=views, backward=backward, seed=draw(st.integers(0, 2**31 - 1)))


# ----------------------------------------------------------------------------
# Inputs: values, gates and strided views
# ----------------------------------------------------------------------------

def gates(kind, shape, gen):
    """float64 gates of one kind: zero, normal (logsigmoid / 16), strong (about -20 per
    step), neginf (normal with ~10% hard resets, -inf) or mix (all of them, per element)."""
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    normal = torch.nn.functional.logsigmoid(r) / 16
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "normal":
        return normal
    if kind == "strong":
        return -20 - r.abs()
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "neginf":
        return normal.masked_fill(u < 0.1, -math.inf)
    pick = torch.randint(0, 4, shape, generator=gen)
    out = torch.where(pick == 0, torch.zeros_like(r), normal)
    out = torch.where(pick == 2, -20 - r.abs(), out)
    return out.masked_fill(pick == 3, -math.inf)


def leaf_view(x, kind, device, gen):
    """(base, view): base a fresh leaf (requires grad) whose view holds x's values as a
    [B, T, H, D] (or [N, H, K, V]) tensor of the given layout; the view's gradient is
    view_of(base.grad)."""
    x = x.to(device)
    if kind == "transposed":  # storage [B, H, T, D]
        base = x.transpose(1, 2).contiguous()
        return base, lambda b: b.transpose(1, 2)
    if kind == "sliced":  # every other element of a last dim twice as wide
        junk = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
        base = torch.stack([x, junk], -1).flatten(-2)
        return base, lambda b: b[..., ::2]
    if kind == "offset":  # one token in: another address, non-contiguous for B > 1
        base = torch.cat([x.new_zeros((x.shape[0], 1, *x.shape[2:])), x], 1)
        return base, lambda b: b[:, 1:]
    return x.clone(), lambda b: b


def state_view(x, kind, device):
    x = x.to(device)
    if kind == "transposed":
        base = x.transpose(-1, -2).contiguous()
        return base, lambda b: b.transpose(-1, -2)
    return x.clone(), lambda b: b


def build(case, device):
    """The case's float64 values (the oracle's inputs, after rounding to the case's
    dtypes) and, per input, (leaf, view function)."""
    gen = torch.Generator().manual_seed(case.seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    vals = {"q": r(B, T, H, K).to(case.dtype), "k": r(B, T, H, K).to(case.dtype),
            "v": r(B, T, H, V).to(case.dtype), "g": gates(case.gate, (B, T, H, K), gen).to(case.g_dtype)}
    if case.h0:
        sd = torch.float64 if case.dtype == torch.float64 else torch.float32
        vals["initial_state"] = r(case.N, H, K, V).to(sd)
    leaves = {}
    for name, x in vals.items():
        if name == "initial_state":
            leaves[name] = state_view(x, case.views[name], device)
        else:
            leaves[name] = leaf_view(x, case.views[name], device, gen)
    return vals, leaves


def cu_of(case, device):
    if case.lengths is None:
        return None
    offsets = [0]
    for n in case.lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def tol_of(case):
    return TOL[case.dtype]


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------

def _run_case(target, case):
    note(f"case: {case}")
    fn = gla_cuda.chunk_gla if case.op == "chunk" else gla_cuda.fused_recurrent_gla
    device = target.device
    vals, leaves = build(case, device)
    cu = cu_of(case, device)
    probe = {n: view(base) for n, (base, view) in leaves.items()}
    choice = gla_cuda.explain_backend(probe["q"], probe["k"], probe["v"], probe["g"], probe.get("initial_state"),
                                      cu, op=f"{case.op}_fwd", backend=target.backend)
    assume(choice.backend is not None)  # sizes this backend does not take (told by its reason)
    with_grad = case.backward and gla_cuda.explain_backend(
        probe["q"], probe["k"], probe["v"], probe["g"], probe.get("initial_state"), cu,
        op=f"{case.op}_bwd", backend=target.backend).backend is not None
    for base, _ in leaves.values():
        base.requires_grad_(with_grad)
    inputs = {n: view(base) for n, (base, view) in leaves.items()}
    o, ht = fn(**inputs, scale=case.scale, output_final_state=case.final, cu_seqlens=cu, backend=target.backend)

    assert o.shape == (case.B, case.T, case.H, case.V) and o.dtype == case.dtype
    assert (ht is not None) == case.final
    gen = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    dht = None
    if case.final:
        assert ht.shape == (case.N, case.H, case.K, case.V)
        dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht)
    ref_o, ref_ht, ref_grads = oracle(vals, case.scale, None if cu is None else cu.cpu(), do.cpu(),
                                      None if dht is None else dht.cpu())
    tol = tol_of(case)
    errors = {"o": rel_err(o, ref_o)}
    dg_tol = tol
    if case.final:
        errors["ht"] = rel_err(ht, ref_ht)
    if with_grad:
        loss = (o.double() * do.double()).sum()
        if case.final:
            loss = loss + (ht.double() * dht.double()).sum()
        loss.backward()
        # dg is returned in g's dtype: float32 g of float64 inputs rounds it
        dg_tol = max(tol, 1e-6) if case.g_dtype == torch.float32 else tol
        for name, ref in zip(("q", "k", "v", "g", "initial_state"), ref_grads):
            if name not in leaves:
                continue
            base, view = leaves[name]
            grad = base.grad if base.grad is not None else torch.zeros_like(base)
            assert grad.dtype == base.dtype, name
            errors["d" + name] = rel_err(view(grad), ref)
            if case.views[name] == "sliced":  # the elements in between get nothing
                assert not grad[..., 1::2].any(), f"d{name} wrote outside the view"
            if name == "g":  # a reset's gradient is 0 exactly (exp(g) is a factor of dg)
                reset = torch.isneginf(vals["g"]).to(device)
                assert not view(grad)[reset].any(), "dg is not 0 at g = -inf"
    note(f"errors: {errors}")
    bad = {k: e for k, e in errors.items() if not e <= (dg_tol if k == "dg" else tol)}
    assert not bad, f"errors over {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize("target", PARAMS)
def test_ops_match_the_oracle(target):
    """chunk_gla and fused_recurrent_gla, forward and backward, on drawn cases."""
    @profile(target)
    @given(case=cases(target))
    def prop(case):
        _run_case(target, case)
    prop()


@st.composite
def pooled_cases(draw, target):
    B = draw(st.sampled_from((0, 1, 2, 4)))
    T = draw(st.sampled_from((0, 1, 2, 3)))
    H = draw(st.sampled_from((0, 1, 2)))
    K = draw(st.sampled_from(target.rec_K))
    V = draw(st.sampled_from((0,) + target.rec_V))
    P = draw(st.integers(B, B + 3))
    slots = draw(st.permutations(range(P)))[:B]
    index = [s if draw(st.integers(0, 4)) else -1 for s in slots]  # some rows have no state
    dtype = draw(st.sampled_from(target.dtypes))
    gate = draw(st.sampled_from(GATES))
    g_dtype = torch.float32 if dtype in (torch.float16, torch.float64) else draw(st.sampled_from((torch.float32, dtype)))
    return dict(B=B, T=T, H=H, K=K, V=V, P=P, index=index, dtype=dtype, g_dtype=g_dtype, gate=gate,
                v_first=draw(st.booleans()), scale=draw(st.sampled_from((None, 0.5))),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("target", [p for p in PARAMS if p.values[0].pooled])
def test_pooled_matches_the_oracle(target):
    """fused_recurrent_gla_pooled: the rows with a slot run from it and write their final
    state back; rows of -1 give zeros; slots no row names are untouched."""
    @profile(target)
    @given(c=pooled_cases(target))
    def prop(c):
        note(f"case: {c}")
        dev = target.device
        gen = torch.Generator().manual_seed(c["seed"])
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        B, T, H, K, V, P = (c[n] for n in "BTHKVP")
        vals = {"q": r(B, T, H, K).to(c["dtype"]), "k": r(B, T, H, K).to(c["dtype"]),
                "v": r(B, T, H, V).to(c["dtype"]), "g": gates(c["gate"], (B, T, H, K), gen).to(c["g_dtype"])}
        pool = r(P, H, K, V).float()
        stored = (pool.transpose(-1, -2) if c["v_first"] else pool).clone(memory_format=torch.contiguous_format)
        stored = stored.to(dev)
        index = torch.tensor(c["index"], dtype=torch.int64, device=dev)
        ins = {n: x.to(dev) for n, x in vals.items()}
        if gla_cuda.explain_backend(**ins, initial_state=stored, op="recurrent_pool_fwd_",
                                    backend=target.backend).backend is None:
            assume(False)
        o = gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=stored, state_index=index, scale=c["scale"],
                                                state_v_first=c["v_first"], backend=target.backend)
        after = stored.transpose(-1, -2) if c["v_first"] else stored
        rows = [b for b, s in enumerate(c["index"]) if s >= 0]
        slots = [c["index"][b] for b in rows]
        sub = {n: x[rows] for n, x in vals.items()}
        sub["initial_state"] = pool[slots].double()
        ref_o, ref_ht = oracle(sub, c["scale"])
        tol = TOL[c["dtype"]]
        assert o.shape == (B, T, H, V) and o.dtype == c["dtype"]
        errors = {"o": rel_err(o[rows], ref_o), "states": rel_err(after[slots], ref_ht)}
        note(f"errors: {errors}")
        # the pool is float32 whatever the inputs' dtype
        assert errors["o"] <= tol and errors["states"] <= max(tol, 1e-6), errors
        skipped = [b for b in range(B) if b not in rows]
        assert not o[skipped].any(), "a row without a state has non-zero output"
        untouched = [s for s in range(P) if s not in slots]
        assert torch.equal(after[untouched].cpu(), pool[untouched]), "a slot no row names was written"
    prop()


# ----------------------------------------------------------------------------
# Sizes of 0: shaped empty results and zero gradients, every backend
# ----------------------------------------------------------------------------

def _runnable(target, op):
    return any(t.backend == target.backend for t in TARGETS) and (op != "pool" or target.pooled)


EMPTY_CASES = {  # name: (B, T, H, K, V, lengths)
    "B=0": (0, 5, 2, 4, 3, None), "T=0": (2, 0, 2, 4, 3, None), "H=0": (2, 5, 0, 4, 3, None),
    "V=0": (2, 5, 2, 4, 0, None), "N=0": (1, 0, 2, 4, 3, ()), "all sequences empty": (1, 0, 2, 4, 3, (0, 0, 0)),
}


@pytest.mark.parametrize("target", PARAMS)
@pytest.mark.parametrize("op", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", list(EMPTY_CASES))
@pytest.mark.parametrize("h0", [False, True])
def test_empty_sizes(target, op, name, h0):
    """A size of 0 gives correctly shaped results without running a kernel (the dispatch
    says so): o zeros, the final state the initial one (or zeros), gradients zeros except
    dh0, which is dht (no token lies between them)."""
    B, T, H, K, V, lengths = EMPTY_CASES[name]
    if target.backend == "cuda":
        K, V = 64, (0 if V == 0 else 64)
    case = Case(op=op, B=B, T=T, H=H, K=K, V=V, dtype=target.dtypes[-1], g_dtype=torch.float32, gate="normal",
                lengths=lengths, h0=h0, views={n: "contiguous" for n in ("q", "k", "v", "g", "initial_state")})
    dev = target.device
    vals, leaves = build(case, dev)
    cu = cu_of(case, dev)
    ins = {n: base.requires_grad_() for n, (base, _) in leaves.items()}
    choice = gla_cuda.explain_backend(*(ins[n] for n in "qkvg"), ins.get("initial_state"), cu,
                                      op=f"{op}_fwd", backend=target.backend)
    assert choice.backend == "empty" and "without launching a kernel" in str(choice), str(choice)
    fn = gla_cuda.chunk_gla if op == "chunk" else gla_cuda.fused_recurrent_gla
    o, ht = fn(**ins, output_final_state=True, cu_seqlens=cu, backend=target.backend)
    N = case.N
    assert o.shape == (B, T, H, V) and o.dtype == case.dtype and not o.any()
    assert ht.shape == (N, H, K, V) and ht.dtype == torch.float32
    assert torch.equal(ht, ins["initial_state"].detach() if h0 else torch.zeros_like(ht))
    dht = torch.randn_like(ht)
    ((o.float() * torch.randn_like(o.float())).sum() + (ht * dht).sum()).backward()
    for n in "qkvg":
        grad = ins[n].grad
        assert grad is None or (grad.shape == ins[n].shape and not grad.any()), n
    if h0:
        assert torch.equal(ins["initial_state"].grad, dht)


@pytest.mark.parametrize("target", [p for p in PARAMS if p.values[0].pooled])
@pytest.mark.parametrize("name", ["B=0", "T=0", "H=0", "V=0"])
def test_empty_sizes_pooled(target, name):
    B, T, H, K, V, _ = EMPTY_CASES[name]
    dev = target.device
    q, k = torch.randn(B, T, H, K, device=dev), torch.randn(B, T, H, K, device=dev)
    v, g = torch.randn(B, T, H, V, device=dev), -torch.rand(B, T, H, K, device=dev)
    pool = torch.randn(B + 2, H, K, V, device=dev)
    before = pool.clone()
    index = torch.arange(B, device=dev)
    o = gla_cuda.fused_recurrent_gla_pooled(q, k, v, g, pool, index, backend=target.backend)
    assert o.shape == (B, T, H, V) and not o.any()
    assert torch.equal(pool, before)  # no token: no state changes


# ----------------------------------------------------------------------------
# Containment: a NaN or inf in one sequence leaves the others bitwise unchanged
# ----------------------------------------------------------------------------

def _run_all(fn, ins, cu, backend, do, dht):
    leaves = {n: x.clone().requires_grad_() for n, x in ins.items()}
    o, ht = fn(**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    return o.detach(), ht.detach(), {n: x.grad for n, x in leaves.items()}


CONTAIN = {  # op: (cu_seqlens, poisoned sequence)
    "chunk": ([0, 5, 70, 71, 140, 204], 2),
    "recurrent": ([0, 5, 9, 10, 17, 20], 1),
}


@pytest.mark.parametrize("target", PARAMS)
@pytest.mark.parametrize("op", ["chunk", "recurrent"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_nonfinite_stays_in_its_sequence(target, op, packed, poison):
    """A NaN (or inf) in q, k, v, g and the initial state of one sequence: every other
    sequence's outputs, final states and gradients are bitwise those of a clean run."""
    offsets, bad = CONTAIN[op]
    if target.device == "cpu" and target.backend == "triton" and op == "recurrent":
        offsets = [0, 2, 5, 6, 9]
    dev = target.device
    K, V = (64, 64) if target.backend == "cuda" else (5, 7)
    dtype = target.dtypes[1] if len(target.dtypes) > 1 else target.dtypes[0]
    lens = [b - a for a, b in zip(offsets, offsets[1:])]
    if packed:
        cu = torch.tensor(offsets, dtype=torch.int32, device=dev)
        B, T, N = 1, offsets[-1], len(lens)
        span = lambda n: (0, slice(offsets[n], offsets[n + 1]))
    else:
        cu = None
        B, T, N = len(lens), max(lens), len(lens)
        span = lambda n: (n, slice(0, T))
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen).to(dev)
    ins = {"q": r(B, T, 2, K).to(dtype), "k": r(B, T, 2, K).to(dtype), "v": r(B, T, 2, V).to(dtype),
           "g": torch.nn.functional.logsigmoid(r(B, T, 2, K)) / 8, "initial_state": r(N, 2, K, V)}
    fn = gla_cuda.chunk_gla if op == "chunk" else gla_cuda.fused_recurrent_gla
    if gla_cuda.explain_backend(**ins, cu_seqlens=cu, op=f"{op}_bwd", backend=target.backend).backend is None:
        pytest.skip(f"{target} has no {op} backward for these sizes")
    do = r(B, T, 2, V)
    dht = r(N, 2, K, V)
    clean = _run_all(fn, ins, cu, target.backend, do, dht)
    value = float(poison)
    b, sl = span(bad)
    hot = {n: x.clone() for n, x in ins.items()}
    first, last = sl.start, sl.stop - 1
    hot["q"][b, first, 0, 0] = value
    hot["k"][b, last, 1, -1] = value
    hot["v"][b, first + 1 if last > first else first, 0, 1] = value
    hot["g"][b, last, 0, 2] = value if poison == "nan" else -value  # g = -inf is legal: +inf is not
    hot["initial_state"][bad, 1, 0, 0] = value
    dirty = _run_all(fn, hot, cu, target.backend, do, dht)
    assert not torch.isfinite(dirty[0][span(bad)]).all(), "the poisoned sequence's output looks clean"
    for n in range(N):
        if n == bad:
            continue
        where = span(n)
        assert torch.equal(dirty[0][where], clean[0][where]), f"o of sequence {n} changed"
        assert torch.equal(dirty[1][n], clean[1][n]), f"final state of sequence {n} changed"
        for name in "qkvg":
            assert torch.equal(dirty[2][name][where], clean[2][name][where]), f"d{name} of sequence {n} changed"
        assert torch.equal(dirty[2]["initial_state"][n], clean[2]["initial_state"][n]), f"dh0 of sequence {n}"


@pytest.mark.parametrize("target", [p for p in PARAMS if p.values[0].pooled])
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_nonfinite_stays_in_its_pooled_row(target, poison):
    """A NaN/inf in one row of a pooled decode (its inputs and its slot) leaves every other
    row's output and slot bitwise unchanged."""
    dev = target.device
    K, V = (64, 64) if target.backend == "cuda" else (5, 7)
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen).to(dev)
    B, T, H = 4, 2, 2
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = torch.nn.functional.logsigmoid(r(B, T, H, K))
    pool = r(6, H, K, V)
    index = torch.tensor([5, 0, 3, 1], device=dev)
    clean_pool = pool.clone()
    clean = gla_cuda.fused_recurrent_gla_pooled(q, k, v, g, clean_pool, index, backend=target.backend)
    hot_q, hot_pool = q.clone(), pool.clone()
    hot_q[2, 1, 0, 0] = float(poison)
    hot_pool[3, 1, 0, 0] = float(poison)
    dirty = gla_cuda.fused_recurrent_gla_pooled(hot_q, k, v, g, hot_pool, index, backend=target.backend)
    assert not torch.isfinite(dirty[2]).all()
    for row in (0, 1, 3):
        assert torch.equal(dirty[row], clean[row]), f"row {row}'s output changed"
        assert torch.equal(hot_pool[index[row]], clean_pool[index[row]]), f"row {row}'s slot changed"
    for slot in (2, 4):
        assert torch.equal(hot_pool[slot], pool[slot])
