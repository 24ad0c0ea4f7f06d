"""GPU limits of every backend: the caller's stream, no host synchronisation, device
guards, memory flat over many calls, and tensors of more than 2**31 elements.

Skipped without CUDA. GLA_TEST_LARGE=1 enables the long ones (10,000 calls; the
> 2**31-element cases, which take ~60 GB of GPU memory and a few minutes); without it the
many-calls test runs 300 calls.
"""
import os

import pytest
import torch

import gla_cuda
from conftest import HAS_CUDA, TOL, make_inputs, oracle, rel_err

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
LARGE = os.environ.get("GLA_TEST_LARGE", "0") == "1"
GPU_BACKENDS = ("cuda", "triton")
MODES = {"chunk": gla_cuda.chunk_gla, "recurrent": gla_cuda.fused_recurrent_gla}


def _needs(backend, op, ins, cu=None):
    choice = gla_cuda.explain_backend(ins["q"], ins["k"], ins["v"], ins["g"], ins.get("initial_state"), cu,
                                      op=op, backend=backend)
    if choice.backend is None:
        pytest.skip(f"{backend} cannot run {op} here: {choice.reasons.get(backend)}")


def _small(device="cuda", T=64, seed=None):
    # T <= 16 also lets the compiled recurrent backward run
    return make_inputs(2, T, 2, 64, 64, dtype=torch.bfloat16, g_dtype=torch.float32, device=device, h0=True,
                       seed=seed)


# ----------------------------------------------------------------------------
# Streams and synchronisation
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("varlen", [False, True])
def test_runs_on_the_current_stream(backend, mode, varlen):
    """Work queued on a side stream: a long sleep, then the inputs' values are written, then
    the op and its backward; only that stream is waited for. A kernel launched on another
    stream would read the old values (the sleep holds the writes back) and fail the oracle."""
    T = 16 if mode == "recurrent" else 130
    cu = torch.tensor([0, 5, T + 3, 2 * T], dtype=torch.int32, device="cuda") if varlen else None
    B = 1 if varlen else 2
    stale = make_inputs(B, 2 * T if varlen else T, 2, 64, 64, dtype=torch.bfloat16, g_dtype=torch.float32,
                        device="cuda", h0=True, N=3 if varlen else None, seed=1)
    fresh = make_inputs(B, 2 * T if varlen else T, 2, 64, 64, dtype=torch.bfloat16, g_dtype=torch.float32,
                        device="cuda", h0=True, N=3 if varlen else None, seed=2)
    _needs(backend, f"{mode}_bwd", stale, cu)
    leaves = {n: x.clone().requires_grad_() for n, x in stale.items()}
    do = torch.randn(fresh["v"].shape, device="cuda", dtype=torch.bfloat16)
    dht = torch.randn(fresh["initial_state"].shape, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs change
        with torch.no_grad():
            for n, x in leaves.items():
                x.copy_(fresh[n])
        o, ht = MODES[mode](**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
        ((o * do).sum() + (ht * dht).sum()).backward()
        out = [o.detach().clone(), ht.detach().clone()] + [leaves[n].grad.clone() for n in fresh]
    side.synchronize()
    ref_o, ref_ht, ref_grads = oracle(fresh, None, cu, do, dht)
    errors = [rel_err(a, b) for a, b in zip(out, (ref_o, ref_ht) + tuple(ref_grads))]
    assert max(errors) <= TOL[torch.bfloat16], errors


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_pooled_runs_on_the_current_stream(backend):
    ins = make_inputs(4, 1, 2, 64, 64, dtype=torch.bfloat16, device="cuda", seed=3)
    pool = torch.randn(6, 2, 64, 64, device="cuda")
    _needs(backend, "recurrent_pool_fwd_", dict(ins, initial_state=pool))
    index = torch.tensor([5, 0, -1, 2], device="cuda")
    fresh_pool = torch.randn_like(pool)
    expected_pool = fresh_pool.clone()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        pool.copy_(fresh_pool)
        o = gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=pool, state_index=index, check_index=False,
                                                backend=backend)
        o = o.clone()
        after = pool.clone()
    side.synchronize()
    rows = [0, 1, 3]
    slots = [5, 0, 2]
    sub = {n: x[rows] for n, x in ins.items()}
    sub["initial_state"] = expected_pool[slots]
    ref_o, ref_ht = oracle(sub)
    assert rel_err(o[rows], ref_o) <= TOL[torch.bfloat16]
    assert rel_err(after[slots], ref_ht) <= TOL[torch.bfloat16]
    assert not o[2].any()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("varlen", [False, True])
def test_no_host_synchronisation(backend, mode, varlen):
    """Forward and backward, cu_seqlens on the GPU included: nothing waits for the GPU
    (torch's sync debug mode raises on any synchronising call)."""
    T = 16 if mode == "recurrent" else 130
    cu = torch.tensor([0, 5, T + 3, 2 * T], dtype=torch.int32, device="cuda") if varlen else None
    ins = make_inputs(1 if varlen else 2, 2 * T if varlen else T, 2, 64, 64, dtype=torch.bfloat16, device="cuda",
                      h0=True, N=3 if varlen else None)
    _needs(backend, f"{mode}_bwd", ins, cu)
    leaves = {n: x.clone().requires_grad_() for n, x in ins.items()}
    MODES[mode](**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)  # compile, cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, ht = MODES[mode](**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
        (o.float().sum() + ht.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_bad_gpu_offsets_are_checked_from_their_host_copy():
    ins = make_inputs(1, 10, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 6, 4, 10], device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens_cpu must be non-decreasing"):
        gla_cuda.chunk_gla(**ins, cu_seqlens=cu, cu_seqlens_cpu=cu.cpu())
    good = torch.tensor([0, 4, 10], device="cuda")
    o, _ = gla_cuda.chunk_gla(**ins, cu_seqlens=good, cu_seqlens_cpu=good.cpu())
    assert o.shape == ins["v"].shape


# ----------------------------------------------------------------------------
# Device guards
# ----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on one, the current device the other)")
@pytest.mark.parametrize("backend", GPU_BACKENDS + ("reference",))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("current,tensors", [(0, 1), (1, 0)])
def test_runs_on_the_tensors_device(backend, mode, current, tensors):
    """The op runs where its tensors are, whatever the current device: right results, on
    that device, and no memory taken on the current one."""
    dev = f"cuda:{tensors}"
    ins = make_inputs(2, 16 if mode == "recurrent" else 130, 2, 64, 64, dtype=torch.bfloat16, device=dev,
                      h0=True, seed=4)
    _needs(backend, f"{mode}_bwd", ins)
    leaves = {n: x.clone().requires_grad_() for n, x in ins.items()}
    with torch.cuda.device(current):
        torch.cuda.synchronize(current)
        before = torch.cuda.memory_allocated(current)
        o, ht = MODES[mode](**leaves, output_final_state=True, backend=backend)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        ((o * do).sum() + (ht * dht).sum()).backward()
        torch.cuda.synchronize(tensors)
        assert torch.cuda.memory_allocated(current) == before, "memory was allocated on the current device"
    assert o.device == torch.device(dev) and ht.device == torch.device(dev)
    ref_o, ref_ht, ref_grads = oracle(ins, None, None, do, dht)
    errors = [rel_err(o, ref_o), rel_err(ht, ref_ht)] + [rel_err(leaves[n].grad, r) for n, r in
                                                         zip(("q", "k", "v", "g", "initial_state"), ref_grads)]
    assert max(errors) <= TOL[torch.bfloat16], errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS + ("reference",))
def test_pooled_runs_on_the_tensors_device(backend):
    ins = make_inputs(3, 1, 2, 64, 64, dtype=torch.bfloat16, device="cuda:1", seed=5)
    pool = torch.randn(4, 2, 64, 64, device="cuda:1")
    _needs(backend, "recurrent_pool_fwd_", dict(ins, initial_state=pool))
    start = pool.clone()
    index = torch.tensor([3, -1, 0], device="cuda:1")
    with torch.cuda.device(0):
        o = gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=pool, state_index=index, backend=backend)
    sub = {n: x[[0, 2]] for n, x in ins.items()}
    sub["initial_state"] = start[[3, 0]]
    ref_o, ref_ht = oracle(sub)
    assert rel_err(o[[0, 2]], ref_o) <= TOL[torch.bfloat16]
    assert rel_err(pool[[3, 0]], ref_ht) <= TOL[torch.bfloat16]


# ----------------------------------------------------------------------------
# Long runs: memory stays flat
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_memory_flat_over_many_calls(backend, mode):
    """Forward + backward many times (10,000 with GLA_TEST_LARGE=1, else 300): the memory
    allocated afterwards is what it was after the first calls (no cache or workspace
    that grows per call, no tensors kept alive)."""
    calls = 10_000 if LARGE else 300
    ins = _small(T=16 if mode == "recurrent" else 64)
    _needs(backend, f"{mode}_bwd", ins)
    leaves = {n: x.clone().requires_grad_() for n, x in ins.items()}

    def step():
        o, ht = MODES[mode](**leaves, output_final_state=True, backend=backend)
        (o.float().sum() + ht.sum()).backward()
        for x in leaves.values():
            x.grad = None

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_pooled_memory_flat_over_many_calls():
    calls = 10_000 if LARGE else 300
    ins = make_inputs(8, 1, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    pool = torch.zeros(8, 2, 64, 64, device="cuda")
    index = torch.arange(8, device="cuda")
    for _ in range(5):
        gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=pool, state_index=index, check_index=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(calls):
        gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=pool, state_index=index, check_index=False)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.isfinite(pool).all()


# ----------------------------------------------------------------------------
# More than 2**31 elements
# ----------------------------------------------------------------------------

BIG_T = 2**20 + 64     # q, k, g: (2**20 + 64) * 16 * 128 > 2**31 elements; 16385 chunks
BIG_H, BIG_K, BIG_V = 16, 128, 64   # V = 64 keeps the backward under ~60 GB
TAIL = 320             # the tokens compared with the oracle (the highest indices)
PIECE = 2**18          # the second path: the prefix's state, chunked in pieces of this many tokens


def _big_inputs():
    torch.manual_seed(0)
    shape = (1, BIG_T, BIG_H, BIG_K)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, BIG_T, BIG_H, BIG_V, device="cuda", dtype=torch.bfloat16)
    g = torch.empty(shape, device="cuda", dtype=torch.bfloat16).uniform_(-6, 2)
    g.copy_(torch.nn.functional.logsigmoid(g) / 8)  # ordinary gates
    return q, k, v, g


def _prefix_state(q, k, v, g, upto):
    """The state entering token `upto`, chunked in pieces of PIECE tokens (each far below
    2**31 elements) on the reference-checked Triton path, carried in float32."""
    state = None
    for s in range(0, upto, PIECE):
        e = min(s + PIECE, upto)
        _, state = gla_cuda.chunk_gla(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], initial_state=state,
                                      output_final_state=True, backend="triton")
    return state


def _tail_oracle(q, k, v, g, h0, do_tail=None, dht=None):
    cut = BIG_T - TAIL
    ins = {"q": q[:, cut:], "k": k[:, cut:], "v": v[:, cut:], "g": g[:, cut:], "initial_state": h0}
    return oracle(ins, None, None, do_tail, dht)


@pytest.mark.skipif(not LARGE, reason="set GLA_TEST_LARGE=1 (about 60 GB of GPU memory, minutes)")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_more_than_2_31_elements_forward(backend, mode):
    """T = 2**20 + 64, H = 16, K = 128, bf16: the last tokens' outputs and the final state
    match the oracle run on them from the state a second path computed."""
    q, k, v, g = _big_inputs()
    _needs(backend, f"{mode}_fwd", dict(q=q, k=k, v=v, g=g))
    o, ht = MODES[mode](q, k, v, g, output_final_state=True, backend=backend)
    o_tail = o[:, -TAIL:].clone()
    del o
    h0 = _prefix_state(q, k, v, g, BIG_T - TAIL)
    ref_o, ref_ht = _tail_oracle(q, k, v, g, h0)
    errors = {"o": rel_err(o_tail, ref_o), "ht": rel_err(ht, ref_ht)}
    assert all(e <= TOL[torch.bfloat16] for e in errors.values()), errors


@pytest.mark.skipif(not LARGE, reason="set GLA_TEST_LARGE=1 (about 60 GB of GPU memory, minutes)")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_more_than_2_31_elements_backward(backend, mode):
    """The backward at the same size, with do nonzero on the last TAIL tokens only and a
    final-state gradient: their dq, dk, dv, dg depend only on those tokens, dht and the
    state entering them, so the oracle on the tail gives them exactly."""
    if (backend, mode) == ("triton", "recurrent"):
        pytest.skip("the Triton recurrent backward keeps float32 dq, dk, dg per V tile: "
                    "3 * 4 tiles * 4 bytes * 2**31 elements, over 100 GB here")
    q, k, v, g = _big_inputs()
    _needs(backend, f"{mode}_bwd", dict(q=q, k=k, v=v, g=g))
    h0 = _prefix_state(q, k, v, g, BIG_T - TAIL)
    torch.cuda.empty_cache()
    do = torch.zeros_like(v)
    do[:, -TAIL:] = torch.randn(1, TAIL, BIG_H, BIG_V, device="cuda", dtype=torch.bfloat16)
    dht = torch.randn(1, BIG_H, BIG_K, BIG_V, device="cuda")
    op = torch.ops.gla.chunk_bwd if mode == "chunk" else torch.ops.gla.recurrent_bwd
    dq, dk, dv, dg, _ = op(q, k, v, g, BIG_K ** -0.5, None, None, do, dht, backend)
    tails = [x[:, -TAIL:].clone() for x in (dq, dk, dv, dg)]
    del dq, dk, dv, dg
    _, _, ref = _tail_oracle(q, k, v, g, h0, do[:, -TAIL:], dht)
    errors = {n: rel_err(t, r) for n, t, r in zip(("dq", "dk", "dv", "dg"), tails, ref[:4])}
    assert all(e <= TOL[torch.bfloat16] for e in errors.values()), errors


@pytest.mark.skipif(not LARGE, reason="set GLA_TEST_LARGE=1")
@pytest.mark.parametrize("backend", ("cuda", "reference"))
def test_pool_of_more_than_2_31_elements(backend):
    """A pool of (2**13 + 1) * 16 * 128 * 128 > 2**31 float32 elements (8.6 GB): rows
    reading and writing its last slots."""
    P, H, K, V = 2**13 + 1, 16, 128, 128
    pool = torch.randn(P, H, K, V, device="cuda")
    ins = make_inputs(4, 2, H, K, V, dtype=torch.bfloat16, device="cuda", seed=6)
    _needs(backend, "recurrent_pool_fwd_", dict(ins, initial_state=pool))
    index = torch.tensor([P - 1, 0, -1, P - 2], device="cuda")
    start = pool[[P - 1, 0, P - 2]].clone()
    o = gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=pool, state_index=index, backend=backend)
    sub = {n: x[[0, 1, 3]] for n, x in ins.items()}
    sub["initial_state"] = start
    ref_o, ref_ht = oracle(sub)
    assert rel_err(o[[0, 1, 3]], ref_o) <= TOL[torch.bfloat16]
    assert rel_err(pool[[P - 1, 0, P - 2]], ref_ht) <= TOL[torch.bfloat16]
