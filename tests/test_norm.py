"""gla::rms_norm_gated, the fused swish-gated RMSNorm of the GLA layer: forward and every
gradient against a float64 evaluation of the formula, on the Triton kernels (on CPU through
TRITON_INTERPRET=1, set by conftest) and the PyTorch reference; opcheck; torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, HAS_CUDA
from gla_cuda.layers import RMSNormGated
from gla_cuda.backends import reference
from gla_cuda.dispatch import norm_backend as rms_norm_gated_backend

EPS = 1e-5
# Relative error ‖out − ref‖ / ‖ref‖ per result dtype; the float64 oracle sees the same
# (rounded) inputs, so this is the rounding of the result plus float32 arithmetic.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm())


def formula(x, gate, weight, eps=EPS):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if gate is not None:
        y = y * F.silu(gate)
    return y


def skip_unless_runs(backend, x, gate=None, weight=None):
    try:
        rms_norm_gated_backend(x, gate, weight, backend)
    except RuntimeError as e:
        pytest.skip(str(e))


def make(shape, dtype, device, has_gate, has_weight, weight_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    D = shape[-1]
    x = (r(*shape) * 2).to(dtype=dtype, device=device)
    gate = (r(*shape) * 2).to(dtype=dtype, device=device) if has_gate else None
    weight = (1 + 0.5 * r(D)).to(dtype=weight_dtype, device=device) if has_weight else None
    return x, gate, weight


def check(x, gate, weight, backend, seed=1):
    """Runs the op forward and backward and compares y, dx, dgate, dweight with float64 autograd."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, gate, weight)]
    y = torch.ops.gla.rms_norm_gated(*leaves, EPS, backend)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, used, dy)

    ref_leaves = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in leaves]
    y64 = formula(*ref_leaves)
    ref_used = [t for t in ref_leaves if t is not None]
    ref_grads = torch.autograd.grad(y64, ref_used, dy.cpu().double())

    errors = {"y": (rel_err(y, y64), y.dtype)}
    names = [n for n, t in zip(("dx", "dgate", "dweight"), leaves) if t is not None]
    for name, g, g64, t in zip(names, grads, ref_grads, used):
        assert g.dtype == t.dtype and g.shape == t.shape
        errors[name] = (rel_err(g, g64), g.dtype)
    bad = {k: e for k, (e, dt) in errors.items() if not e <= TOL[dt]}
    assert not bad, f"relative errors above tolerance: {bad} (all: {errors})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("D", [100, 200])
@pytest.mark.parametrize("has_gate", [True, False])
@pytest.mark.parametrize("has_weight", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(device, backend, D, has_gate, has_weight, dtype):
    x, gate, weight = make((2, 19, 3, D), dtype, device, has_gate, has_weight)
    skip_unless_runs(backend, x, gate, weight)
    check(x, gate, weight, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3,), (7,), (5, 3), (3, 64), (4, 512), (2, 1000), (0, 3, 64)])
def test_shapes(device, shape):
    """Any leading shape (none, and zero rows too) and D from 3 to past 512
    (not D = 1: there dx is pure cancellation, ~eps / |x|^3)."""
    x, gate, weight = make(shape, torch.float32, device, True, True)
    skip_unless_runs("triton", x, gate, weight)
    if x.numel() == 0:
        x, gate, weight = (t.requires_grad_() for t in (x, gate, weight))
        y = torch.ops.gla.rms_norm_gated(x, gate, weight, EPS, "triton")
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape and (weight.grad == 0).all()
        return
    check(x, gate, weight, "triton")


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_strides(device):
    """x bf16, gate float32, weight bf16; x and gate as strided views (row stride > D)."""
    D = 96
    base_x, gate, weight = make((3, 11, 2 * D), torch.bfloat16, device, True, True,
                                weight_dtype=torch.bfloat16)
    x, weight = base_x[..., :D], weight[D:]
    gate = gate.float()[..., D:]
    assert not x.is_contiguous() and not gate.is_contiguous()
    skip_unless_runs("triton", x, gate, weight)
    check(x, gate, weight, "triton")
    check(x.transpose(0, 1), gate.transpose(0, 1), weight, "triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_weight", [True, False])
def test_many_programs(device, has_weight):
    """Kernel tilings the defaults do not reach on CPU: blocks of rows that do not divide the
    row count, several backward programs each summing part of the weight gradient."""
    from gla_cuda.backends.triton.norm import rms_norm_gated_bwd, rms_norm_gated_fwd
    x, gate, weight = make((37, 100), torch.float32, device, True, has_weight)
    skip_unless_runs("triton", x, gate, weight)
    dy = torch.randn_like(x)
    y = rms_norm_gated_fwd(x, gate, weight, EPS, block_m=4)
    assert rel_err(y, reference.rms_norm_gated_fwd(x, gate, weight, EPS)) < 1e-6
    expected = reference.rms_norm_gated_bwd(dy, x, gate, weight, EPS)
    for programs in (1, 3, 10):
        got = rms_norm_gated_bwd(dy, x, gate, weight, EPS, block_m=4, programs=programs)
        for a, b in zip(got, expected):
            assert (a is None) == (b is None)
            if a is not None:
                assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_deterministic(device):
    x, gate, weight = make((2, 100 if device == "cpu" else 3000, 128), torch.bfloat16, device, True, True)
    skip_unless_runs("triton", x, gate, weight)
    dy = torch.randn_like(x)
    first = torch.ops.gla.rms_norm_gated_bwd(dy, x, gate, weight, EPS, "triton")
    for _ in range(3):
        again = torch.ops.gla.rms_norm_gated_bwd(dy, x, gate, weight, EPS, "triton")
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_gate,has_weight", [(True, True), (False, False)])
def test_opcheck(device, has_gate, has_weight):
    x, gate, weight = make((2, 5, 40), torch.float32, device, has_gate, has_weight)
    skip_unless_runs("triton", x, gate, weight)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, gate, weight)]
    torch.library.opcheck(torch.ops.gla.rms_norm_gated, (*leaves, EPS, "triton"))
    dy = torch.randn_like(x)
    detached = [t.detach() if t is not None else None for t in leaves]
    torch.library.opcheck(torch.ops.gla.rms_norm_gated_bwd, (dy, *detached, EPS, "triton"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(device, dynamic, monkeypatch):
    """The layer's RMSNormGated, forward and backward, compiled with no graph break (the Triton
    kernels forced through GLA_BACKEND), equals eager, also over changing T."""
    monkeypatch.setenv("GLA_BACKEND", "triton")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    norm = RMSNormGated(48).to(device)
    with torch.no_grad():
        norm.weight.add_(torch.randn(48, device=device) * 0.3)

    def loss(x, g):
        return (norm(x, g).float() ** 2).sum()

    def grads(fn, x, g):
        x, g = x.clone().requires_grad_(), g.clone().requires_grad_()
        norm.weight.grad = None
        out = fn(x, g)
        out.backward()
        return out, x.grad, g.grad, norm.weight.grad

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    skip_unless_runs("triton", torch.empty(1, 48, device=device, dtype=dtype))
    for T in (9, 20, 33) if dynamic else (20,):
        x, g, _ = make((2, T, 3, 48), dtype, device, True, False, seed=T)
        for a, b in zip(grads(compiled, x, g), grads(loss, x, g)):
            assert rel_err(a, b) <= TOL[dtype]


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("GLA_BACKEND", raising=False)
    x = torch.randn(3, 8)
    assert rms_norm_gated_backend(x) == "reference"  # auto on CPU tensors
    assert rms_norm_gated_backend(x.double(), backend="reference") == "reference"
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32"):
        rms_norm_gated_backend(x.double(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        rms_norm_gated_backend(x, backend="cuda")
    monkeypatch.setenv("GLA_BACKEND", "reference")
    assert rms_norm_gated_backend(x) == "reference"
    if HAS_CUDA:
        monkeypatch.setenv("GLA_BACKEND", "cuda")  # no compiled norm kernel: auto
        assert rms_norm_gated_backend(x.cuda()) == "triton"
    with pytest.raises(ValueError, match="gate must have"):
        torch.ops.gla.rms_norm_gated(x, x[:2], None, EPS, "reference")
    with pytest.raises(ValueError, match="weight must have"):
        torch.ops.gla.rms_norm_gated(x, None, torch.ones(7), EPS, "reference")


def test_module_matches_formula_float64():
    """RMSNormGated on float64 (the reference path) against the formula, and gradcheck."""
    norm = RMSNormGated(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(norm(x, g), formula(x, g, norm.weight), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, g, w: torch.ops.gla.rms_norm_gated(x, g, w, EPS, "reference"),
                                    (x, g, norm.weight.detach().requires_grad_()))
