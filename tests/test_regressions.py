"""One test per defect found on hostile inputs, named for it (the property tests of
test_properties.py find such cases; these pin them down on every backend that runs here)."""
import math

import pytest
import torch

import gla_cuda
from conftest import BACKENDS, DEVICES, MODES, TOL, make_inputs, oracle, rel_err, skip_unless_runs

GRADS = ("q", "k", "v", "g", "initial_state")


def _fwd_bwd(mode, backend, ins, cu_seqlens=None):
    leaves = {n: x.detach().clone().requires_grad_() for n, x in ins.items()}
    o, ht = MODES[mode](**leaves, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return o, ht, {n: leaves[n].grad for n in leaves}, do, dht


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_batch_of_size_zero(device, backend, mode):
    """B = 0 raised 'stack expects a non-empty TensorList' (the reference stacked no final
    states); now [0, ...] results and zero-sized gradients, without a kernel."""
    ins = make_inputs(0, 9, 2, 64, 64, device=device, h0=True)
    o, ht, grads, _, _ = _fwd_bwd(mode, backend, ins)
    assert o.shape == (0, 9, 2, 64) and ht.shape == (0, 2, 64, 64)
    assert all(grads[n].shape == ins[n].shape for n in grads)


@pytest.mark.parametrize("fn", MODES.values())
def test_head_dim_zero_is_rejected_naming_K(fn):
    """K = 0 raised ZeroDivisionError from the default scale K ** -0.5; it has no meaning
    (no scores), so the call is refused naming K."""
    ins = make_inputs(1, 5, 2, 0, 3)
    with pytest.raises(ValueError, match="head dim K >= 1"):
        fn(**ins)
    with pytest.raises(ValueError, match="head dim K >= 1"):
        fn(**ins, scale=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_gate_is_a_hard_reset(device, backend, mode, dtype):
    """g = -inf (exp(g) = 0: the state is forgotten) gave NaN in the chunked form
    (-inf - (-inf) in the cumulative gates); the exact result is finite and dg is 0 there.
    Resets at a chunk's first row, inside chunks, a whole token, and runs of them."""
    ins = make_inputs(2, 130, 2, 64, 64, dtype=dtype, device=device, h0=True, seed=11)
    g = ins["g"]
    g[0, 0] = -math.inf          # first token: the initial state is dropped
    g[0, 64, 0] = -math.inf      # a chunk's first row, one head
    g[1, 30:33, :, :5] = -math.inf
    g[1, 100, 1, 7] = -math.inf
    g[1, 120, 0, :] = -1e30      # far below GATE_MIN: the same as -inf
    skip_unless_runs(f"{mode}_fwd", backend, ins)
    skip_unless_runs(f"{mode}_bwd", backend, ins)
    o, ht, grads, do, dht = _fwd_bwd(mode, backend, ins)
    ref_o, ref_ht, ref_grads = oracle(ins, None, None, do, dht)
    tol = TOL[dtype]
    errors = {"o": rel_err(o, ref_o), "ht": rel_err(ht, ref_ht)}
    errors.update({f"d{n}": rel_err(grads[n], r) for n, r in zip(GRADS, ref_grads)})
    assert all(e <= tol for e in errors.values()), errors
    reset = g <= -128
    assert not grads["g"][reset].any(), "dg is not 0 where g is a reset"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_every_gate_neg_inf(device, backend, mode):
    """Every gate -inf: each token sees only itself, o_t = scale <q_t, k_t> v_t; dg is 0."""
    ins = make_inputs(1, 70, 2, 64, 64, device=device, h0=True, gate="zero")
    ins["g"].fill_(-math.inf)
    skip_unless_runs(f"{mode}_bwd", backend, ins)
    o, ht, grads, _, _ = _fwd_bwd(mode, backend, ins)
    q, k, v = (ins[n].double().cpu() for n in "qkv")
    expected = 64 ** -0.5 * (q * k).sum(-1, keepdim=True) * v
    assert rel_err(o, expected) <= TOL[torch.float32]
    assert rel_err(ht, k[:, -1, :, :, None] * v[:, -1, :, None, :]) <= TOL[torch.float32]
    assert not grads["g"].any() and not grads["initial_state"].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_shared_with_its_inputs_is_rejected(device, backend):
    """A state pool that shares memory with an input would be read after being written:
    the call is refused before anything is written."""
    base = torch.zeros(4 * 2 * 8 * 8 + 64, device=device)
    pool = base[:4 * 2 * 8 * 8].view(4, 2, 8, 8)
    q = base[-64:].view(2, 1, 2, 16)[..., :8]
    k, g = torch.randn(2, 1, 2, 8, device=device), -torch.rand(2, 1, 2, 8, device=device)
    v = torch.randn(2, 1, 2, 8, device=device)
    q_overlap = pool.view(-1)[:32].view(2, 1, 2, 8)
    before = pool.clone()
    with pytest.raises(ValueError, match="state_pool must not share memory"):
        gla_cuda.fused_recurrent_gla_pooled(q_overlap, k, v, g, pool, torch.tensor([0, 1], device=device),
                                            backend=backend)
    assert torch.equal(pool, before)
    # the same storage without overlap is fine
    o = gla_cuda.fused_recurrent_gla_pooled(q.contiguous(), k, v, g, pool, torch.tensor([0, 1], device=device),
                                            backend=None)
    assert o.shape == (2, 1, 2, 8)


def test_empty_inputs_on_the_serving_and_gv_ops():
    """Sizes of 0 on the ops whose empty results are not zeros alone: a packed prefill of a
    sequence with no tokens still moves its state to its output slot (copy-on-write), and the
    verify and gv ops return empty outputs (the empty-input path once raised KeyError here)."""
    from gla_cuda.serving import chunk_gla_pooled, fused_recurrent_gla_verify_pooled
    H, K, V = 2, 8, 8
    pool = torch.randn(4, H, K, V)
    before = pool.clone()
    q, v = torch.randn(1, 0, H, K), torch.randn(1, 0, H, V)
    o = chunk_gla_pooled(q, q, v, q, pool, torch.tensor([0]), cu_seqlens=torch.tensor([0, 0]),
                         final_state_indices=torch.tensor([2]))
    assert o.shape == (1, 0, H, V)
    assert torch.equal(pool[2], before[0]) and torch.equal(pool[[0, 1, 3]], before[[0, 1, 3]])
    q, v = torch.randn(2, 0, H, K), torch.randn(2, 0, H, V)
    o = fused_recurrent_gla_verify_pooled(q, q, v, q, pool, torch.zeros(2, 0, dtype=torch.long))
    assert o.shape == (2, 0, H, V) and torch.equal(pool[[0, 1, 3]], before[[0, 1, 3]])
    o, ht = gla_cuda.fused_recurrent_gla(q, q, v, q, gv=torch.randn(2, 0, H, V), output_final_state=True)
    assert o.shape == (2, 0, H, V) and torch.equal(ht, torch.zeros(2, H, K, V))
