"""Keyword parity with fla-core 0.6.0: ``fla.ops.gla.chunk_gla`` and ``fla.ops.gla.fused_recurrent_gla``
and gla_cuda's functions of the same names, called with the same keyword arguments, give the
same outputs, final states and gradients (every argument of fla's signatures, alone and together).

fla's signatures and gla_cuda's, by position (keywords are what switching libraries relies on):

  chunk_gla   fla:      q, k, v, g, scale, initial_state, output_final_state, state_v_first,
                        cu_seqlens, cu_seqlens_cpu
              gla_cuda: q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend,
                        *, state_v_first, cu_seqlens_cpu
  fused_recurrent_gla
              fla:      q, k, v, gk, gv, scale, initial_state, output_final_state, reverse,
                        state_v_first, cu_seqlens, **kwargs
              gla_cuda: q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend,
                        *, gk, gv, reverse, state_v_first, cu_seqlens_cpu

The first seven positions of chunk_gla and the first four of fused_recurrent_gla mean the same
(gla_cuda's g is fla's gk). Beyond them the orders differ (gla_cuda keeps scale fifth and
cu_seqlens eighth in both functions): a call that passes fla's later arguments by position
either means the same in gla_cuda or is rejected with a TypeError naming the argument, never
silently computed differently (test_positional_calls_agree_or_raise).

Differences that remain, by design: fla's fused_recurrent_gla swallows unknown keywords in
**kwargs (a stray g= is ignored there, and the keys are then not gated); gla_cuda takes g as
the key gate and rejects unknown keywords. fla's deprecated transpose_state_layout is
accepted as its alias of state_v_first, as fla does.

Thresholds: each library is within TOL[dtype] (gla_cuda.testing) of the float64 answer, so
the two are within 2 * TOL[dtype] of each other (triangle inequality); fla's float32 kernels on
a GPU use TF32 matrix products, and its bfloat16 kernels round intermediate chunk states and
attention blocks to bfloat16, so neither library is closer to the other than to the answer.

On a CPU-only machine fla's kernels run under the Triton interpreter (conftest's
fla_kernels_on_cpu); with a GPU the same cases run on CUDA, in float32 and bfloat16, with a
sequence long enough for several of fla's 64-token chunks.
"""
import inspect
import warnings

import pytest
import torch

pytest.importorskip("fla", reason="flash-linear-attention is not installed (an optional test dependency)")

import gla_cuda  # noqa: E402
from conftest import FLA_DEVICES, TOL, rel_err  # noqa: E402

from fla.ops.gla import chunk_gla as fla_chunk_gla  # noqa: E402
from fla.ops.gla import fused_recurrent_gla as fla_fused_recurrent_gla  # noqa: E402

pytestmark = pytest.mark.usefixtures("fla_kernels_on_cpu")

H, K, V = 2, 16, 24


def sizes(device):
    """(B, T) for equal lengths and the packed lengths: tiny on the interpreter; on a GPU,
    more than one 64-token chunk per sequence."""
    if device == "cpu":
        return 2, 9, [5, 1, 11]
    return 2, 150, [70, 1, 130]


def dtypes(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


def tol(dtype):
    return 2 * TOL[dtype]


def gate(*shape, device):
    return torch.nn.functional.logsigmoid(torch.randn(*shape, device=device)) / 4


def make_case(device, dtype, varlen, names):
    """Fresh random tensors for the keyword names wanted (q, k, v always), as fla expects them:
    gates float32 (as gla_cuda's GLA layer and fla's own pass them), states float32; with
    varlen, one packed row and cu_seqlens (int64, as fla's LongTensor)."""
    B, T, lens = sizes(device)
    if varlen:
        B, T = 1, sum(lens)
    N = len(lens) if varlen else B
    ins = {"q": torch.randn(B, T, H, K, device=device).to(dtype),
           "k": torch.randn(B, T, H, K, device=device).to(dtype),
           "v": torch.randn(B, T, H, V, device=device).to(dtype)}
    for n in names:
        if n in ("g", "gk"):
            ins[n] = gate(B, T, H, K, device=device)
        elif n == "gv":
            ins[n] = gate(B, T, H, V, device=device)
        elif n == "initial_state":
            ins[n] = torch.randn(N, H, K, V, device=device)
    if varlen:
        offsets = [0]
        for L in lens:
            offsets.append(offsets[-1] + L)
        ins["cu_seqlens"] = torch.tensor(offsets, dtype=torch.long, device=device)
    return ins


def run(fn, ins, options, do, dht):
    """fn(**ins, **options) on fresh leaves: (o, final state, {name: gradient})."""
    leaves = {n: (x.detach().clone().requires_grad_() if x.is_floating_point() else x) for n, x in ins.items()}
    o, ht = fn(**leaves, **options)
    loss = (o.float() * do).sum()
    if ht is not None:
        loss = loss + (ht * dht).sum()
    loss.backward()
    return o, ht, {n: x.grad for n, x in leaves.items() if x.is_floating_point()}


def check_same(ours_fn, fla_fn, ins, options, dtype):
    """Both functions with the same keyword arguments: outputs, states and every gradient."""
    o_shape = (*ins["q"].shape[:3], V)
    do = torch.randn(o_shape, device=ins["q"].device)
    ht_shape = None
    if options.get("output_final_state"):
        N = ins["cu_seqlens"].numel() - 1 if "cu_seqlens" in ins else ins["q"].shape[0]
        ht_shape = (N, H, V, K) if options.get("state_v_first") else (N, H, K, V)
    dht = None if ht_shape is None else torch.randn(ht_shape, device=ins["q"].device)
    o, ht, grads = run(ours_fn, ins, options, do, dht)
    ref_o, ref_ht, ref_grads = run(fla_fn, ins, options, do, dht)
    assert o.shape == ref_o.shape and o.dtype == ref_o.dtype == ins["v"].dtype
    assert rel_err(o, ref_o) <= tol(dtype), "o"
    if ht_shape is None:
        assert ht is None and ref_ht is None
    else:
        assert ht.shape == ref_ht.shape == ht_shape and ht.dtype == ref_ht.dtype == torch.float32
        assert rel_err(ht, ref_ht) <= tol(dtype), "final state"
    assert set(grads) == set(ref_grads)
    for n in grads:
        assert grads[n].shape == ref_grads[n].shape and grads[n].dtype == ref_grads[n].dtype, n
        assert rel_err(grads[n], ref_grads[n]) <= tol(dtype), f"d{n}"


def as_v_first(ins):
    if "initial_state" in ins:
        ins["initial_state"] = ins["initial_state"].transpose(-1, -2).contiguous()
    return ins


# Each case: (tensors drawn, other keywords, packed sequences). Together they pass every
# argument of fla's signature, alone and with the others.
CHUNK_CASES = {
    "defaults": (["g"], {}, False),
    "scale": (["g"], dict(scale=0.3), False),
    "output_final_state": (["g"], dict(output_final_state=True), False),
    "initial_state": (["g", "initial_state"], dict(output_final_state=True), False),
    "initial_state_no_final": (["g", "initial_state"], dict(output_final_state=False), False),
    "state_v_first": (["g", "initial_state"], dict(output_final_state=True, state_v_first=True), False),
    "cu_seqlens": (["g", "initial_state"], dict(output_final_state=True), True),
    "cu_seqlens_cpu_state_v_first_scale": (["g", "initial_state"],
                                           dict(output_final_state=True, state_v_first=True, scale=0.7), True),
}

RECURRENT_CASES = {
    "no_gate": ([], {}, False),
    "gk": (["gk"], {}, False),
    "gv": (["gv"], dict(output_final_state=True), False),
    "gk_gv_initial_state": (["gk", "gv", "initial_state"], dict(output_final_state=True), False),
    "scale": (["gk"], dict(scale=0.3, output_final_state=True), False),
    "reverse": (["gk", "initial_state"], dict(output_final_state=True, reverse=True), False),
    "reverse_gv": (["gk", "gv", "initial_state"], dict(output_final_state=True, reverse=True), False),
    "state_v_first": (["gk", "initial_state"], dict(output_final_state=True, state_v_first=True), False),
    "state_v_first_gv": (["gk", "gv", "initial_state"], dict(output_final_state=True, state_v_first=True),
                         False),
    "cu_seqlens": (["gk", "initial_state"], dict(output_final_state=True), True),
    "cu_seqlens_reverse": (["gk", "initial_state"], dict(output_final_state=True, reverse=True), True),
    "cu_seqlens_everything": (["gk", "gv", "initial_state"],
                              dict(output_final_state=True, reverse=True, state_v_first=True, scale=0.7), True),
}


def test_cases_cover_every_fla_argument():
    """Every parameter of fla's two functions appears in some case, and gla_cuda takes it."""
    for fla_fn, ours, cases in ((fla_chunk_gla, gla_cuda.chunk_gla, CHUNK_CASES),
                                (fla_fused_recurrent_gla, gla_cuda.fused_recurrent_gla, RECURRENT_CASES)):
        params = [p.name for p in inspect.signature(fla_fn).parameters.values()
                  if p.kind is not inspect.Parameter.VAR_KEYWORD]
        covered = {"q", "k", "v"}
        for names, options, varlen in cases.values():
            covered |= set(names) | set(options) | ({"cu_seqlens"} if varlen else set())
        if fla_fn is fla_chunk_gla:
            covered.add("cu_seqlens_cpu")  # passed alongside cu_seqlens in the cu_seqlens_cpu case
        assert set(params) <= covered, set(params) - covered
        assert set(params) <= set(inspect.signature(ours).parameters)


@pytest.mark.parametrize("device", FLA_DEVICES)
@pytest.mark.parametrize("case", CHUNK_CASES)
def test_chunk_gla_same_keywords(device, case):
    names, options, varlen = CHUNK_CASES[case]
    for dtype in dtypes(device):
        ins = make_case(device, dtype, varlen, names)
        if options.get("state_v_first"):
            ins = as_v_first(ins)
        if case.startswith("cu_seqlens_cpu"):
            ins["cu_seqlens_cpu"] = ins["cu_seqlens"].cpu()
        check_same(gla_cuda.chunk_gla, fla_chunk_gla, ins, options, dtype)


@pytest.mark.parametrize("device", FLA_DEVICES)
@pytest.mark.parametrize("case", RECURRENT_CASES)
def test_fused_recurrent_gla_same_keywords(device, case):
    names, options, varlen = RECURRENT_CASES[case]
    for dtype in dtypes(device):
        ins = make_case(device, dtype, varlen, names)
        if options.get("state_v_first"):
            ins = as_v_first(ins)
        check_same(gla_cuda.fused_recurrent_gla, fla_fused_recurrent_gla, ins, options, dtype)


@pytest.mark.parametrize("device", FLA_DEVICES)
def test_transpose_state_layout_alias(device):
    """fla's deprecated name for state_v_first: the same warning and results."""
    ins = as_v_first(make_case(device, torch.float32, False, ["gk", "initial_state"]))
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        o, ht = gla_cuda.fused_recurrent_gla(**ins, output_final_state=True, transpose_state_layout=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ref_o, ref_ht = fla_fused_recurrent_gla(**ins, output_final_state=True, transpose_state_layout=True)
    assert rel_err(o, ref_o) <= tol(torch.float32) and rel_err(ht, ref_ht) <= tol(torch.float32)
    with pytest.raises(ValueError, match="state_v_first.*transpose_state_layout"):
        gla_cuda.fused_recurrent_gla(**ins, state_v_first=True, transpose_state_layout=True)


def _agree_or_raise(ours_fn, fla_fn, args):
    """ours(*args) either raises a TypeError (naming an argument, or too many positional
    arguments) or equals fla(*args)."""
    try:
        o, ht = ours_fn(*args)
    except TypeError as e:
        assert "must be" in str(e) or "positional arguments" in str(e), e
        return False
    ref_o, ref_ht = fla_fn(*args)
    assert rel_err(o, ref_o) <= tol(torch.float32)
    assert (ht is None) == (ref_ht is None)
    if ht is not None:
        assert rel_err(ht, ref_ht) <= tol(torch.float32)
    return True


@pytest.mark.parametrize("device", FLA_DEVICES)
def test_positional_calls_agree_or_raise(device):
    """fla's arguments passed by position, each prefix of its signature, with non-default values
    and with the defaults spelled out: where the orders differ, gla_cuda raises."""
    ins = make_case(device, torch.float32, True, ["g", "gk", "gv", "initial_state"])
    q, k, v, cu = ins["q"], ins["k"], ins["v"], ins["cu_seqlens"]
    h0 = ins["initial_state"]
    chunk_args = [q, k, v, ins["g"], 0.3, h0, True, False, cu, cu.cpu()]
    chunk_defaults = [q, k, v, ins["g"], None, None, False, False, None, None]
    rec_args = [q, k, v, ins["gk"], ins["gv"], 0.3, h0, True, True, False, cu]
    rec_defaults = [q, k, v, ins["gk"], None, None, None, False, False, False, None]
    # with cu_seqlens only at position 9 (chunk) or 11 (recurrent), the shorter prefixes
    # describe one packed row of 3 sequences with one initial state: unpacked, that is B = 1
    h0_one = h0[:1]
    for args in (chunk_args, rec_args):
        args[5 if args is chunk_args else 6] = h0_one
    agreed = [_agree_or_raise(gla_cuda.chunk_gla, fla_chunk_gla, chunk_args[:n]) for n in range(4, 9)]
    assert agreed == [True, True, True, True, False]  # 8th: fla's state_v_first, gla_cuda's cu_seqlens
    agreed = [_agree_or_raise(gla_cuda.chunk_gla, fla_chunk_gla, chunk_defaults[:n]) for n in range(4, 11)]
    assert agreed == [True, True, True, True, False, False, False]
    agreed = [_agree_or_raise(gla_cuda.fused_recurrent_gla, fla_fused_recurrent_gla, rec_args[:n])
              for n in range(3, 11)]
    assert agreed == [True, True] + [False] * 6  # 5th: fla's gv, gla_cuda's scale
    agreed = [_agree_or_raise(gla_cuda.fused_recurrent_gla, fla_fused_recurrent_gla, rec_defaults[:n])
              for n in range(3, 12)]
    # fla's gv=None, scale=None, initial_state=None sit where gla_cuda's scale, initial_state and
    # output_final_state are: the same defaults; from the 8th on, gla_cuda's cu_seqlens gets a bool
    assert agreed == [True] * 5 + [False] * 4
