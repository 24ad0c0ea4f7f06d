"""gla_cuda.conv: the short causal convolution of GLA layers with use_short_conv, its cache
layout ([N, D, W], the last W inputs) and every path against a float64 loop."""
import pytest
import torch
import torch.nn.functional as F

from gla_cuda import conv
from conftest import HAS_CUDA, TOL, rel_err


def oracle(xs, weight, bias, states=None):
    """float64 loop over each sequence (a list of [L, D] tensors): outputs and final states."""
    D, W = weight.shape
    w, b = weight.double(), (torch.zeros(D) if bias is None else bias).double()
    ys, finals = [], []
    for i, x in enumerate(xs):
        s = torch.zeros(D, W, dtype=torch.float64) if states is None else states[i].double()
        ext = torch.cat([s.T, x.double()])  # [W + L, D]: the state's W inputs, then the tokens
        y = [F.silu(b + (ext[t + 1:t + 1 + W].T * w).sum(-1)) for t in range(x.shape[0])]
        ys.append(torch.stack(y) if y else x.new_zeros(0, D).double())
        finals.append(ext[-W:].T)
    return ys, torch.stack(finals)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def tol(dtype):
    return 1e-6 if dtype == torch.float32 else TOL[dtype]


IMPLS = ["torch", "reference"]
if HAS_CUDA and conv.causal_conv1d_available():
    IMPLS.append("causal_conv1d")


def device_of(impl):
    return "cuda" if impl == "causal_conv1d" else "cpu"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("W", [2, 4, 5])
@pytest.mark.parametrize("with_state", [False, True])
def test_batch_matches_loop(impl, W, with_state):
    if impl == "causal_conv1d" and W > 4:
        pytest.skip("causal-conv1d takes widths 2..4")
    dev = device_of(impl)
    B, T, D = 3, 9, 12
    x, weight, bias = rand(B, T, D, seed=1), rand(D, W, seed=2), rand(D, seed=3)
    state = rand(B, D, W, seed=4) if with_state else None
    y, final = conv.causal_conv1d(x.to(dev), weight.to(dev), bias.to(dev), True,
                                  None if state is None else state.to(dev), True, impl=impl)
    ys, finals = oracle(list(x), weight, bias, state)
    assert y.dtype == x.dtype and final.dtype == x.dtype and final.shape == (B, D, W)
    assert rel_err(y, torch.stack(ys)) <= tol(x.dtype)
    assert rel_err(final, finals) <= tol(x.dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_sequences_match_loop(impl, with_state):
    """cu_seqlens: each sequence starts from its own state (or zeros); lengths below W and 0."""
    dev = device_of(impl)
    lengths, D, W = [6, 0, 2, 9], 8, 4
    cu = torch.tensor([0] + lengths).cumsum(0)
    x, weight = rand(1, sum(lengths), D, seed=5), rand(D, W, seed=6)
    state = rand(len(lengths), D, W, seed=7) if with_state else None
    y, final = conv.causal_conv1d(x.to(dev), weight.to(dev), None, True,
                                  None if state is None else state.to(dev), True, cu.to(dev), impl=impl)
    ys, finals = oracle(list(x[0].split(lengths)), weight, None, state)
    assert rel_err(y[0], torch.cat(ys)) <= tol(x.dtype)
    assert rel_err(final, finals) <= tol(x.dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_skips_positions(impl):
    """A masked position is absent: windows reach back over it, the state ignores it."""
    dev = device_of(impl)
    B, T, D, W = 3, 10, 8, 3
    x, weight, bias, state = rand(B, T, D, seed=8), rand(D, W, seed=9), rand(D, seed=10), rand(B, D, W, seed=11)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :4] = False          # left padding
    mask[1, [2, 3, 7]] = False   # holes
    mask[2] = False              # nothing: the state passes through
    y, final = conv.causal_conv1d(x.to(dev), weight.to(dev), bias.to(dev), True, state.to(dev), True,
                                  mask=mask.to(dev), impl=impl)
    ys, finals = oracle([x[b][mask[b]] for b in range(B)], weight, bias, state)
    for b in range(B):
        assert rel_err(y[b][mask[b].to(dev)], ys[b]) <= tol(x.dtype) if mask[b].any() else True
    assert rel_err(final, finals) <= tol(x.dtype)
    assert torch.equal(final[2].cpu(), state[2])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_continue_a_prefill(impl, dtype):
    """Prefill, then one token at a time through step(): equals one pass over everything."""
    dev = device_of(impl)
    B, T, D, W = 2, 12, 16, 4
    m = conv.ShortConvolution(D, W, bias=True).to(dev, dtype)
    m.impl = impl
    x = rand(B, T, D, seed=12, dtype=dtype).to(dev)
    with torch.no_grad():
        full, full_state = m(x, output_final_state=True)
        y, state = m(x[:, :5], output_final_state=True)
        outs = [y]
        for t in range(5, T):
            before = state.clone()
            y, new = m.step(x[:, t:t + 1], state)
            assert torch.equal(state, before)  # step() leaves its argument alone
            outs.append(y)
            state = new
    assert rel_err(torch.cat(outs, 1), full) <= tol(dtype)
    assert rel_err(state, full_state) <= tol(dtype)


def test_step_mask_keeps_the_state():
    m = conv.ShortConvolution(8, 4)
    state, x = rand(2, 8, 4, seed=13), rand(2, 1, 8, seed=14)
    with torch.no_grad():
        _, new = m.step(x, state, torch.tensor([True, False]))
    assert torch.equal(new[1], state[1]) and torch.equal(new[0, :, -1], x[0, 0])
    assert torch.equal(new[0, :, :-1], state[0, :, 1:])


def test_gradients_match_between_paths():
    D, W = 6, 4
    x, weight, bias, state = rand(2, 7, D, seed=15), rand(D, W, seed=16), rand(D, seed=17), rand(2, D, W, seed=18)
    grads = []
    for impl in ("torch", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, state)]
        y, final = conv.causal_conv1d(*leaves[:3], True, leaves[3], True, impl=impl)
        (y.square().sum() + final.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert a is not None and rel_err(a, b) <= 1e-6


def test_parameters_as_fla():
    m = conv.ShortConvolution(8, 3, bias=True)
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {"weight": (8, 1, 3), "bias": (8,)}
    with pytest.raises(ValueError, match="activation must be"):
        conv.ShortConvolution(8, 3, activation="relu")
    with pytest.raises(ValueError, match="impl must be one of"):
        conv.causal_conv1d(rand(1, 2, 8), rand(8, 3), impl="cudnn")
    if not conv.causal_conv1d_available():
        with pytest.raises(RuntimeError, match="causal-conv1d package is not installed"):
            conv.causal_conv1d(rand(1, 2, 8), rand(8, 3), impl="causal_conv1d")
