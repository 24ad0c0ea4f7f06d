"""The pooled decode op (fused_recurrent_gla_pooled): in-place pool updates, skipped rows,
both state layouts, bad arguments, opcheck, torch.compile and CUDA-graph capture."""
import pytest
import torch

import gla_cuda
from conftest import BACKENDS, DEVICES, HAS_CUDA, TOL, make_inputs, oracle, rel_err, runs

P, H, K, V = 7, 2, 32, 40


def _pool(device, v_first, seed=0, K=K, V=V):
    gen = torch.Generator().manual_seed(seed)
    shape = (P, H, V, K) if v_first else (P, H, K, V)
    return torch.randn(*shape, generator=gen).to(device)


def _runs(backend, ins, pool):  # the pool stands in for initial_state in the backend choice
    return runs("recurrent_pool_fwd_", backend, {**ins, "initial_state": pool})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS + [None])
@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(K, V), (30, 42)])  # float4 state accesses; element-wise ones
def test_pool_matches_recurrence(device, backend, v_first, T, dtype, K, V):
    index = torch.tensor([4, -1, 0, 6, -1], device=device)
    B = index.numel()
    ins = make_inputs(B, T, H, K, V, dtype=dtype, g_dtype=torch.float32, device=device)
    pool = _pool(device, v_first, K=K, V=V)
    if not _runs(backend, ins, pool):
        pytest.skip(f"{backend} cannot run the pooled op here")
    before = pool.clone()
    o = gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=pool, state_index=index,
                                            state_v_first=v_first, backend=backend)

    rows, slots = [0, 2, 3], [4, 0, 6]
    h0 = before[slots].transpose(-1, -2) if v_first else before[slots]
    ref_o, ref_ht = oracle({**{n: x[rows] for n, x in ins.items()}, "initial_state": h0})
    ref_ht = ref_ht.transpose(-1, -2) if v_first else ref_ht
    tol = TOL[dtype]
    assert rel_err(o[rows], ref_o) <= tol
    assert rel_err(pool[slots], ref_ht) <= tol
    assert torch.equal(o[[1, 4]], torch.zeros_like(o[[1, 4]]))  # skipped rows: zeros
    untouched = [1, 2, 3, 5]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("device", DEVICES)
def test_pool_decode_loop_matches_one_pass(device):
    """Token-by-token steps through the pool equal one recurrent pass over the sequence."""
    T = 6
    ins = make_inputs(2, T, H, K, V, device=device, h0=True)
    pool = torch.zeros(P, H, K, V, device=device)
    index = torch.tensor([5, 1], device=device)
    pool[index] = ins["initial_state"]
    steps = [gla_cuda.fused_recurrent_gla_pooled(*(ins[n][:, t:t + 1] for n in "qkvg"), pool, index)
             for t in range(T)]
    ref_o, ref_ht = oracle(ins)
    assert rel_err(torch.cat(steps, 1), ref_o) <= TOL[torch.float32]
    assert rel_err(pool[index], ref_ht) <= TOL[torch.float32]


def test_pool_bad_arguments_leave_the_pool_alone():
    ins = make_inputs(3, 1, H, K, V)
    pool = _pool("cpu", False)
    before = pool.clone()
    good = torch.tensor([0, 1, 2])
    call = lambda **kw: gla_cuda.fused_recurrent_gla_pooled(
        **ins, **{"state_pool": pool, "state_index": good, **kw})
    cases = [
        (dict(state_index=torch.tensor([0, 7, 1])), ValueError, r"state_index values must be in \[-1, P\) = \[-1, 7\), got 7"),
        (dict(state_index=torch.tensor([0, -2, 1])), ValueError, "got -2"),
        (dict(state_index=torch.tensor([3, 1, 3])), ValueError, "uses a pool slot twice"),
        (dict(state_index=torch.tensor([0.0, 1.0, 2.0])), ValueError, "state_index must be an int32 or int64"),
        (dict(state_index=torch.tensor([0, 1])), ValueError, r"shape \[B\] = \[3\]"),
        (dict(state_index=[0, 1, 2]), TypeError, "state_index must be a Tensor"),
        (dict(state_pool=pool.double()), TypeError, "state_pool must be float32"),
        (dict(state_pool=pool[:, :1]), ValueError, r"state_pool must have shape \[P, H, K, V\]"),
        (dict(state_pool=pool, state_v_first=True), ValueError, r"\[P, H, V, K\]"),
        (dict(state_pool=_pool("cpu", True).transpose(-1, -2)), ValueError, "must be contiguous"),
        (dict(state_pool=pool.to("meta")), ValueError, "state_pool is on meta"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    assert torch.equal(pool, before)
    call()  # the right arguments run
    assert not torch.equal(pool[:3], before[:3]) and torch.equal(pool[3:], before[3:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("v_first", [False, True])
def test_pool_opcheck(device, v_first):
    ins = make_inputs(3, 2, H, K, V, dtype=torch.bfloat16, g_dtype=torch.float32, device=device)
    index = torch.tensor([2, -1, 0], device=device, dtype=torch.int32)
    args = (ins["q"], ins["k"], ins["v"], ins["g"], 0.2, _pool(device, v_first), index, v_first)
    torch.library.opcheck(torch.ops.gla.recurrent_pool_fwd_, args + ("auto",))
    if device == "cuda" and _runs("cuda", ins, args[5]):
        torch.library.opcheck(torch.ops.gla.cuda_recurrent_pool_fwd_, args)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_compile_fullgraph(device):
    torch._dynamo.reset()
    ins = make_inputs(3, 1, H, K, V, device=device)
    index = torch.tensor([2, -1, 0], device=device)
    pools = [_pool(device, False) for _ in range(2)]

    def f(q, k, v, g, pool):
        return gla_cuda.fused_recurrent_gla_pooled(q, k, v, g, pool, index) * 2

    a = torch.compile(f, fullgraph=True)(*(ins[n] for n in "qkvg"), pools[0])
    b = f(*(ins[n] for n in "qkvg"), pools[1])
    assert rel_err(a, b) <= 1e-6 and rel_err(pools[0], pools[1]) <= 1e-6


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_pool_cuda_graph_replay():
    """A serving step captured once and replayed with new tokens and a new index."""
    ins = make_inputs(4, 1, H, K, V, dtype=torch.bfloat16, device="cuda")
    pool = _pool("cuda", False)
    if not _runs("cuda", ins, pool):
        pytest.skip("the cuda backend cannot run the pooled op")
    static = {n: x.clone() for n, x in ins.items()}
    index = torch.tensor([0, 1, 2, 3], device="cuda")
    step = lambda: gla_cuda.fused_recurrent_gla_pooled(**static, state_pool=pool, state_index=index,
                                                       check_index=False, backend="cuda")
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    fresh = make_inputs(4, 1, H, K, V, dtype=torch.bfloat16, device="cuda")
    for n, x in fresh.items():
        static[n].copy_(x)
    index.copy_(torch.tensor([6, -1, 2, 4]))
    before = pool.clone()
    graph.replay()
    captured, after = out.clone(), pool.clone()
    pool.copy_(before)
    expected = step()
    assert torch.equal(captured, expected) and torch.equal(after, pool)
    assert torch.equal(after[[0, 1, 3, 5]], before[[0, 1, 3, 5]])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_auto_takes_the_recurrent_kernel_for_short_sequences_only():
    """auto: the CUDA recurrent forward up to 16 tokens per sequence on average, Triton
    beyond (measured faster there); forcing cuda still runs it."""
    short = make_inputs(4, 16, H, K, V, dtype=torch.bfloat16, device="cuda")
    long = make_inputs(4, 17, H, K, V, dtype=torch.bfloat16, device="cuda")
    if gla_cuda.explain_backend(**short, op="recurrent_fwd", backend="cuda").backend is None:
        pytest.skip("the cuda backend cannot run the recurrent forward here")
    assert gla_cuda.explain_backend(**short, op="recurrent_fwd").backend == "cuda"
    choice = gla_cuda.explain_backend(**long, op="recurrent_fwd")
    assert choice.backend == "triton" and "more than 16 tokens" in choice.reasons["cuda"]
    assert gla_cuda.explain_backend(**long, op="recurrent_fwd", backend="cuda").backend == "cuda"
    cu = torch.tensor([0, 30, 31, 32, 33, 68], device="cuda")  # 68 tokens, 5 sequences: 13.6 each
    packed = make_inputs(1, 68, H, K, V, dtype=torch.bfloat16, device="cuda")
    assert gla_cuda.explain_backend(**packed, cu_seqlens=cu, op="recurrent_fwd").backend == "cuda"
