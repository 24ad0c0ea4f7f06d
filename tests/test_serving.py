"""Serving over a state pool (gla_cuda/serving.py): chunked prefill from and to slots with
copy-on-write and checkpoints, speculative-decoding verify with per-token slots, padding,
index checks, and a mixed prefill + decode step replayed from a CUDA graph."""
import pytest
import torch
import torch.nn.functional as F

import gla_cuda
from conftest import DEVICES, HAS_CUDA, TOL, make_inputs, oracle, rel_err, skip_unless_runs

H, K, V = 2, 16, 32
POOL_BACKENDS = ["reference", "triton", None]


def _pool(P, device, v_first, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (P, H, V, K) if v_first else (P, H, K, V)
    return torch.randn(*shape, generator=gen).to(device)


def _kv(pool_slot, v_first):
    """A slot's state in [H, K, V]."""
    return pool_slot.transpose(-1, -2) if v_first else pool_slot


def _packed(lens, device, dtype=torch.float32, seed=None):
    ins = make_inputs(1, sum(lens), H, K, V, dtype=dtype, g_dtype=torch.float32, device=device, seed=seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=device)
    return ins, cu


def _seq(ins, cu, n, start=0, stop=None):
    """Sequence n's inputs (tokens start:stop of it) as a batch of one."""
    s, e = cu[n].item(), cu[n + 1].item()
    e = e if stop is None else s + stop
    return {name: x[:, s + start:e] for name, x in ins.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_recurrence(device, backend, v_first, dtype):
    """Every output and every slot written against the float64 recurrence; every slot not
    named bitwise unchanged; padding sequences give zeros."""
    if dtype == torch.bfloat16 and device == "cpu" and backend != "reference":
        pytest.skip("bfloat16 on the Triton interpreter is covered by the chunked-kernel tests")
    lens = [70, 0, 130, 5, 64]
    N, P = len(lens), 16
    ins, cu = _packed(lens, device, dtype)
    pool = _pool(P, device, v_first, seed=int(torch.randint(0, 2**31, ())))
    before = pool.clone()
    index = torch.tensor([3, 10, -1, 5, 7], device=device)          # sequence 2 is padding
    has = torch.tensor([True, True, True, False, True], device=device)
    final = torch.tensor([11, 10, 12, 5, -1], device=device)        # 0: copy-on-write 3 -> 11
    marks = torch.tensor([[0, 1], [2, -1], [8, 9], [4, 6], [13, 14]], device=device)
    o = gla_cuda.chunk_gla_pooled(**ins, state_pool=pool, state_indices=index, cu_seqlens=cu,
                                  has_initial_state=has, final_state_indices=final, checkpoint_every=64,
                                  checkpoint_indices=marks, state_v_first=v_first, check_indices=True,
                                  backend=backend)
    tol = TOL[dtype]
    expected = {}  # slot -> float64 state
    for n in range(N):
        seq = _seq(ins, cu, n)
        if n == 2:
            assert torch.equal(o[:, cu[n]:cu[n + 1]], torch.zeros_like(seq["v"]))
            continue
        h0 = _kv(before[index[n]], v_first)[None] if has[n] else torch.zeros(1, H, K, V)
        ref_o, ref_ht = oracle({**seq, "initial_state": h0})
        if lens[n]:
            assert rel_err(o[:, cu[n]:cu[n + 1]], ref_o) <= tol, n
        if final[n] >= 0:
            expected[final[n].item()] = ref_ht[0]
        for j, slot in enumerate(marks[n].tolist()):
            pos = 64 * (j + 1)
            if pos <= lens[n] and slot >= 0:
                expected[slot] = oracle({**_seq(ins, cu, n, 0, pos), "initial_state": h0})[1][0]
    assert sorted(expected) == [0, 5, 10, 11, 13]
    for slot, ref in expected.items():
        assert rel_err(_kv(pool[slot], v_first), ref) <= tol, slot
    untouched = [s for s in range(P) if s not in expected]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.skipif(not HAS_CUDA, reason="the compiled prefill needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", None])
@pytest.mark.parametrize("HKV", [(3, 64, 64), (2, 128, 128), (2, 128, 256), (1, 256, 512)])
@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_prefill_matches_recurrence(backend, HKV, v_first, dtype):
    """The compiled prefill (slots read and written inside the chunked forward's walks) at the
    head dims its kernels cover: outputs (written into a NaN-filled out, so a row it misses
    shows), final states, copy-on-write, fresh sequences, padding and checkpoints every 64 and
    128 tokens against the float64 recurrence; slots not named stay bitwise unchanged."""
    Hh, Kk, Vv = HKV
    lens = [130, 0, 64, 1, 200, 77]
    N, P, T = len(lens), 24, sum(lens)
    ins = make_inputs(1, T, Hh, Kk, Vv, dtype=dtype, g_dtype=torch.float32, device="cuda")
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda")
    skip_unless_runs("chunk_fwd", "cuda", ins, cu)
    shape = (P, Hh, Vv, Kk) if v_first else (P, Hh, Kk, Vv)
    pool = torch.randn(*shape, device="cuda")
    before = pool.clone()
    index = torch.tensor([3, 10, 5, -1, 7, 9], device="cuda", dtype=torch.int32)   # 3: padding
    has = torch.tensor([True, True, False, True, True, True], device="cuda")
    final = torch.tensor([11, 10, 5, 12, -1, 9], device="cuda")   # 0: copy-on-write 3 -> 11
    marks = torch.tensor([[0, 1, 2], [13, 14, 15], [4, -1, 6], [16, 17, 18], [19, 20, 21], [22, 23, -1]],
                         device="cuda")
    every = 64 if Kk < 256 else 128
    out = torch.full_like(ins["v"], float("nan"))
    o = gla_cuda.chunk_gla_pooled(**ins, state_pool=pool, state_indices=index, cu_seqlens=cu,
                                  has_initial_state=has, final_state_indices=final, checkpoint_every=every,
                                  checkpoint_indices=marks, state_v_first=v_first, out=out,
                                  check_indices=True, backend=backend)
    assert o.data_ptr() == out.data_ptr()
    choice = gla_cuda.explain_backend(**ins, initial_state=pool, cu_seqlens=cu, op="chunk_pool_fwd_",
                                      backend=backend)
    assert choice.backend == "cuda", str(choice)
    tol = TOL[dtype]
    expected = {}
    for n in range(N):
        s, e = cu[n].item(), cu[n + 1].item()
        seq = {name: x[:, s:e] for name, x in ins.items()}
        if index[n] < 0:
            assert torch.equal(o[:, s:e], torch.zeros_like(seq["v"]))
            continue
        h0 = _kv(before[index[n]], v_first)[None] if has[n] else torch.zeros(1, Hh, Kk, Vv)
        ref_o, ref_ht = oracle({**seq, "initial_state": h0})
        if lens[n]:
            assert rel_err(o[:, s:e], ref_o) <= tol, n
        if final[n] >= 0:
            expected[final[n].item()] = ref_ht[0]
        for j, slot in enumerate(marks[n].tolist()):
            pos = every * (j + 1)
            if pos <= lens[n] and slot >= 0:
                expected[slot] = oracle({**{name: x[:, s:s + pos] for name, x in ins.items()},
                                         "initial_state": h0})[1][0]
    for slot, ref in expected.items():
        assert rel_err(_kv(pool[slot], v_first), ref) <= tol, slot
    untouched = [s for s in range(P) if s not in expected]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_prefill_dense_batch_and_out(device, backend):
    """Equal-length sequences without cu_seqlens, into a preallocated out."""
    ins = make_inputs(3, 40, H, K, V, device=device)
    pool = _pool(5, device, False, seed=1)
    before = pool.clone()
    index = torch.tensor([4, 0, 2], device=device)
    out = torch.full_like(ins["v"], float("nan"))
    o = gla_cuda.chunk_gla_pooled(**ins, state_pool=pool, state_indices=index, out=out, backend=backend)
    assert o.data_ptr() == out.data_ptr()
    ref_o, ref_ht = oracle({**ins, "initial_state": before[index.cpu()]})
    assert rel_err(out, ref_o) <= TOL[torch.float32]
    assert rel_err(pool[index], ref_ht) <= TOL[torch.float32]
    assert torch.equal(pool[[1, 3]], before[[1, 3]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("v_first", [False, True])
def test_chunked_prefill_then_decode_equals_one_pass(device, backend, v_first):
    """Two prefill chunks and three decode steps through the pool equal one chunk_gla over
    the whole sequence (and the float64 recurrence)."""
    T1, T2, D = 96, 37, 3
    ins = make_inputs(2, T1 + T2 + D, H, K, V, device=device)
    pool = _pool(6, device, v_first, seed=2)
    index = torch.tensor([4, 1], device=device)
    part = lambda a, b: {n: x[:, a:b] for n, x in ins.items()}
    fresh = torch.zeros(2, dtype=torch.bool, device=device)
    o1 = gla_cuda.chunk_gla_pooled(**part(0, T1), state_pool=pool, state_indices=index,
                                   has_initial_state=fresh, state_v_first=v_first, backend=backend)
    o2 = gla_cuda.chunk_gla_pooled(**part(T1, T1 + T2), state_pool=pool, state_indices=index,
                                   state_v_first=v_first, backend=backend)
    steps = [gla_cuda.fused_recurrent_gla_pooled(*part(t, t + 1).values(), pool, index,
                                                 state_v_first=v_first)
             for t in range(T1 + T2, T1 + T2 + D)]
    o = torch.cat([o1, o2] + steps, 1)
    whole, ht = gla_cuda.chunk_gla(**ins, output_final_state=True)
    ref_o, ref_ht = oracle(ins)
    tol = TOL[torch.float32]
    assert rel_err(o, ref_o) <= tol and rel_err(whole, ref_o) <= tol
    assert rel_err(o, whole.double()) <= tol
    assert rel_err(_kv(pool[index], v_first), ref_ht) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_checkpoints_equal_plain_run_states(device, backend):
    """A checkpoint every 128 tokens equals chunk_gla's final state over that prefix, and
    resuming from a checkpoint (prefix reuse) equals the uninterrupted run."""
    T = 300
    ins = make_inputs(1, T, H, K, V, device=device)
    pool = _pool(8, device, False, seed=3)
    index = torch.tensor([0], device=device)
    marks = torch.tensor([[5, 6, 7]], device=device)   # 128 and 256; 384 is past the end
    before = pool.clone()
    gla_cuda.chunk_gla_pooled(**ins, state_pool=pool, state_indices=index,
                              has_initial_state=torch.tensor([False], device=device),
                              checkpoint_every=128, checkpoint_indices=marks, backend=backend)
    for slot, pos in ((5, 128), (6, 256)):
        _, ref = gla_cuda.chunk_gla(**{n: x[:, :pos] for n, x in ins.items()}, output_final_state=True)
        assert rel_err(pool[slot], ref[0].double()) <= TOL[torch.float32]
    assert torch.equal(pool[7], before[7])
    # prefix reuse: resume from the 256-token checkpoint into slot 3 (copy-on-write)
    tail = {n: x[:, 256:] for n, x in ins.items()}
    o = gla_cuda.chunk_gla_pooled(**tail, state_pool=pool, state_indices=torch.tensor([6], device=device),
                                  final_state_indices=torch.tensor([3], device=device), backend=backend)
    ref_o, ref_ht = oracle(ins)
    assert rel_err(o, ref_o[:, 256:]) <= TOL[torch.float32]
    assert rel_err(pool[3], ref_ht[0]) <= TOL[torch.float32]
    assert rel_err(pool[0], ref_ht[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_verify_rollback_equals_accepted_tokens_only(device, backend, v_first, varlen):
    """vLLM's scheme: each row owns T slots (one index row, the same every step). Step 1
    verifies T drafts from the state in its first slot and stores the state after every
    token; step 2 starts each row from slot a - 1 (a = its accepted drafts): equal to
    running only the accepted tokens, with no recomputation."""
    N, T, P = 4, 4, 24
    ins1 = make_inputs(N, T, H, K, V, device=device)
    ins2 = make_inputs(N, T, H, K, V, device=device)
    pool = _pool(P, device, v_first, seed=int(torch.randint(0, 2**31, ())))
    idx = torch.arange(N * T, device=device).view(N, T) + 3
    h0 = _kv(pool[idx[:, 0]], v_first).clone()                       # the rows' start states
    o1 = _verify(ins1, pool, idx, None, v_first, backend, varlen)
    ref1, _ = oracle({**ins1, "initial_state": h0})
    assert rel_err(o1, ref1) <= TOL[torch.float32]
    for t in range(T):
        ref_t = oracle({**{n: x[:, :t + 1] for n, x in ins1.items()}, "initial_state": h0})[1]
        assert rel_err(_kv(pool[idx[:, t]], v_first), ref_t) <= TOL[torch.float32]

    accepted = torch.tensor([1, 3, 2, 2], device=device)
    idx2 = idx.clone()
    idx2[2] = -1          # row 2: padding
    idx2[3, 3] = -1       # row 3: the state after its last draft is not stored
    mid = pool.clone()
    o2 = _verify(ins2, pool, idx2, accepted, v_first, backend, varlen)
    written = set()
    for n in range(N):
        if n == 2:
            assert torch.equal(o2[n], torch.zeros_like(o2[n]))
            continue
        a = accepted[n].item()
        run = {m: torch.cat([ins1[m][n:n + 1, :a], ins2[m][n:n + 1]], 1) for m in ins1}
        ref_o, _ = oracle({**run, "initial_state": h0[n:n + 1]})
        assert rel_err(o2[n], ref_o[0, a:]) <= TOL[torch.float32], n
        for t in range(T):
            slot = idx2[n, t].item()
            if slot >= 0:
                written.add(slot)
                ref_t = oracle({**{m: x[:, :a + t + 1] for m, x in run.items()},
                                "initial_state": h0[n:n + 1]})[1]
                assert rel_err(_kv(pool[slot], v_first), ref_t[0]) <= TOL[torch.float32], (n, t)
    untouched = [s for s in range(P) if s not in written]
    assert torch.equal(pool[untouched], mid[untouched])


def _verify(ins, pool, idx, accepted, v_first, backend, varlen):
    N, T = ins["q"].shape[:2]
    cu = None
    if varlen:  # the same rows, packed
        ins = {n: x.reshape(1, N * T, *x.shape[2:]) for n, x in ins.items()}
        cu = torch.arange(N + 1, device=idx.device) * T
    o = gla_cuda.fused_recurrent_gla_verify_pooled(**ins, state_pool=pool, state_indices=idx,
                                                   num_accepted_tokens=accepted, cu_seqlens=cu,
                                                   state_v_first=v_first, check_indices=True,
                                                   backend=backend)
    return o.view(N, T, *o.shape[2:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_verify_one_token_is_the_decode_step(device, backend):
    """T = 1 without num_accepted_tokens is the pooled decode step."""
    ins = make_inputs(5, 1, H, K, V, device=device)
    pool = _pool(9, device, False, seed=5)
    other = pool.clone()
    index = torch.tensor([4, -1, 0, 8, 2], device=device)
    o = gla_cuda.fused_recurrent_gla_verify_pooled(**ins, state_pool=pool, state_indices=index[:, None],
                                                   backend=backend)
    o_ref = gla_cuda.fused_recurrent_gla_pooled(**ins, state_pool=other, state_index=index,
                                                backend="reference")
    assert rel_err(o, o_ref.double()) <= TOL[torch.float32]
    assert rel_err(pool, other.double()) <= TOL[torch.float32]
    assert torch.equal(o[1], torch.zeros_like(o[1]))


def _bad_cases(device):
    z = lambda *x: torch.tensor(x, device=device)
    prefill = [
        (dict(state_indices=z(0, 9)), ValueError, r"state_indices values must be in \[-1, P\) = \[-1, 8\), got 9"),
        (dict(state_indices=z(0, -2)), ValueError, "got -2"),
        (dict(state_indices=z(3, 3)), ValueError, "pool slot 3 is written twice"),
        (dict(final_state_indices=z(4, 4)), ValueError, "pool slot 4 is written twice"),
        (dict(final_state_indices=z(1, 2)), ValueError, "pool slot 1 is read by sequence 1 and written by sequence 0"),
        (dict(checkpoint_every=64, checkpoint_indices=z([5], [5])), ValueError, "pool slot 5 is written twice"),
        (dict(checkpoint_every=64, checkpoint_indices=z([8], [-1])), ValueError, "checkpoint_indices values"),
        (dict(checkpoint_every=32, checkpoint_indices=z([5], [6])), ValueError, "checkpoint_every must be a positive multiple of 64"),
        (dict(checkpoint_every=64), ValueError, "checkpoint_every needs checkpoint_indices"),
        (dict(checkpoint_every=64, checkpoint_indices=z(5, 6)), ValueError, r"checkpoint_indices must be an int32 or int64 tensor of shape \[2, any\]"),
        (dict(state_indices=z(0.0, 1.0)), ValueError, "state_indices must be an int32 or int64"),
        (dict(state_indices=z(0, 1, 2)), ValueError, r"state_indices must be an int32 or int64 tensor of shape \[2\]"),
        (dict(state_indices=[0, 1]), TypeError, "state_indices must be a Tensor"),
        (dict(has_initial_state=z(1, 0)), ValueError, "has_initial_state must be a bool"),
        (dict(cu_seqlens=z(0, 70, 90)), ValueError, "cu_seqlens must end at the packed length T=134"),
        (dict(cu_seqlens=z(0, 80, 70, 100)), ValueError, r"state_indices must be an int32 or int64 tensor of shape \[3\]"),
        (dict(out=torch.empty(1, 134, H, V + 1, device=device)), ValueError, "out must be a torch.float32 tensor of v's shape"),
        (dict(state_pool=torch.zeros(8, H, K, V, device=device).double()), TypeError, "state_pool must be float32"),
        (dict(state_pool=torch.zeros(8, H, V, K, device=device)), ValueError, r"state_pool must have shape \[P, H, K, V\]"),
    ]
    verify = [
        (dict(state_indices=z([0, 1], [2, 12])), ValueError, r"state_indices values must be in \[-1, P\) = \[-1, 12\)"),
        (dict(state_indices=z([0, 1], [1, 2])), ValueError, "pool slot 1 is written twice"),
        (dict(num_accepted_tokens=z(0, 1)), ValueError, r"num_accepted_tokens values must be in \[1, S\] = \[1, 2\], got 0"),
        (dict(num_accepted_tokens=z(1, 3)), ValueError, "got 3"),
        (dict(num_accepted_tokens=z(1, 2), state_indices=z([0, 3], [3, 4])), ValueError, "pool slot 3"),
        (dict(state_indices=z([0], [2])), ValueError, r"state_indices must have a slot per token: shape \[N, S\] with S >= T = 2"),
        (dict(state_indices=z(0, 2)), ValueError, r"state_indices must be an int32 or int64 tensor of shape \[2, any\]"),
        (dict(num_accepted_tokens=z(1.0, 1.0)), ValueError, "num_accepted_tokens must be an int32 or int64"),
    ]
    return prefill, verify


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["prefill", "verify"])
def test_bad_arguments_raise_and_write_nothing(device, which):
    prefill, verify = _bad_cases(device)
    if which == "prefill":
        ins, cu = _packed([64, 70], device)
        pool = _pool(8, device, False, seed=6)
        good = dict(state_pool=pool, state_indices=torch.tensor([0, 1], device=device), cu_seqlens=cu)
        call, cases = gla_cuda.chunk_gla_pooled, prefill
    else:
        ins = make_inputs(2, 2, H, K, V, device=device)
        pool = _pool(12, device, False, seed=7)
        good = dict(state_pool=pool, state_indices=torch.tensor([[0, 1], [2, 3]], device=device))
        call, cases = gla_cuda.fused_recurrent_gla_verify_pooled, verify
    before = pool.clone()
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**ins, **{**good, **kwargs}, check_indices=True, backend="reference")
        assert torch.equal(pool, before), kwargs
    # the same calls with good indices run
    call(**ins, **good, check_indices=True, backend="reference")
    assert not torch.equal(pool, before)


def test_index_checks_are_off_by_default(monkeypatch):
    """check_indices=None reads GLA_CHECK_INDICES (off): a slot out of range is skipped like -1."""
    monkeypatch.delenv("GLA_CHECK_INDICES", raising=False)
    ins = make_inputs(2, 1, H, K, V)
    pool = _pool(4, "cpu", False, seed=8)
    before = pool.clone()
    o = gla_cuda.fused_recurrent_gla_verify_pooled(**ins, state_pool=pool,
                                                   state_indices=torch.tensor([[9], [1]]))
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.equal(pool[[0, 2, 3]], before[[0, 2, 3]])
    monkeypatch.setenv("GLA_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="state_indices values"):
        gla_cuda.fused_recurrent_gla_verify_pooled(**ins, state_pool=pool, state_indices=torch.tensor([[9], [1]]))


def test_opcheck_pool_ops():
    """Schemas (Tensor(a!) / Tensor(b!)), fake kernels and the implementation agree."""
    ins, cu = _packed([70, 10], "cpu")
    pool = _pool(6, "cpu", True, seed=9)
    o = torch.empty_like(ins["v"])
    torch.library.opcheck(torch.ops.gla.chunk_pool_fwd_,
                          (ins["q"], ins["k"], ins["v"], ins["g"], 0.25, pool, torch.tensor([1, 4]),
                           torch.tensor([True, False]), torch.tensor([2, 4]), cu, 64,
                           torch.tensor([[0], [-1]]), True, o, "reference"))
    ins = make_inputs(3, 2, H, K, V)
    o = torch.empty_like(ins["v"])
    torch.library.opcheck(torch.ops.gla.recurrent_verify_pool_fwd_,
                          (ins["q"], ins["k"], ins["v"], ins["g"], 0.25, pool,
                           torch.tensor([[0, 1], [2, 3], [-1, -1]]), torch.tensor([2, 1, 1]), None, True, o,
                           "reference"))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("v_first", [False, True])
def test_mixed_step_replays_from_a_cuda_graph(v_first):
    """A serving step (3 prefill sequences from their slots, with a checkpoint, and 48 decode
    rows) captured once and replayed with new inputs and new indices."""
    dev = "cuda"
    lens, R, P = [130, 64, 17], 48, 128
    T = sum(lens)
    pool = _pool(P, dev, v_first, seed=10)
    static = dict(pre=make_inputs(1, T, H, K, V, dtype=torch.bfloat16, g_dtype=torch.float32, device=dev),
                  dec=make_inputs(R, 1, H, K, V, dtype=torch.bfloat16, g_dtype=torch.float32, device=dev))
    cu = torch.tensor([0, 130, 194, 211], device=dev)
    pidx, has = torch.zeros(3, dtype=torch.int64, device=dev), torch.ones(3, dtype=torch.bool, device=dev)
    marks = torch.full((3, 2), -1, dtype=torch.int64, device=dev)
    didx = torch.zeros(R, 1, dtype=torch.int64, device=dev)

    def step():
        a = gla_cuda.chunk_gla_pooled(**static["pre"], state_pool=pool, state_indices=pidx, cu_seqlens=cu,
                                      has_initial_state=has, checkpoint_every=64, checkpoint_indices=marks,
                                      state_v_first=v_first)
        b = gla_cuda.fused_recurrent_gla_verify_pooled(**static["dec"], state_pool=pool, state_indices=didx,
                                                       state_v_first=v_first)
        return a, b

    def load(seed):
        gen = torch.Generator().manual_seed(seed)
        slots = torch.randperm(P, generator=gen)
        pidx.copy_(slots[:3]); didx.copy_(slots[3:3 + R, None])
        marks.copy_(torch.tensor([[slots[100], slots[101]], [-1, -1], [-1, -1]]))
        has.copy_(torch.tensor([True, False, True]))
        for part in static.values():
            for n, x in make_inputs(*part["q"].shape[:2], H, K, V, dtype=torch.bfloat16,
                                    g_dtype=torch.float32, device=dev, seed=seed).items():
                part[n].copy_(x)
        return slots

    load(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        slots = load(seed)
        before = pool.clone()
        graph.replay()
        torch.cuda.synchronize()
        other = before.clone()
        ref = (gla_cuda.chunk_gla_pooled(**static["pre"], state_pool=other, state_indices=pidx, cu_seqlens=cu,
                                         has_initial_state=has, checkpoint_every=64, checkpoint_indices=marks,
                                         state_v_first=v_first, backend="reference"),
               gla_cuda.fused_recurrent_gla_verify_pooled(**static["dec"], state_pool=other, state_indices=didx,
                                                          state_v_first=v_first, backend="reference"))
        for got, want in zip(outs, ref):
            assert rel_err(got, want.double()) <= TOL[torch.bfloat16]
        written = slots[:3 + R].tolist() + [slots[100].item(), slots[101].item()]
        assert rel_err(pool[written], other[written].double()) <= TOL[torch.bfloat16]
        untouched = [i for i in range(P) if i not in set(written)]
        assert torch.equal(pool[untouched], before[untouched])


def test_pool_ops_under_torch_compile():
    """Traced through their fake kernels (in-place writes functionalised), index checks skipped:
    the compiled step writes the same outputs and slots as the eager one."""
    ins, cu = _packed([70, 10], "cpu")
    dec = make_inputs(3, 2, H, K, V)
    idx = torch.tensor([3, 1])
    didx = torch.tensor([[0, 2], [4, 5], [-1, -1]])

    def step(pool):
        a = gla_cuda.chunk_gla_pooled(**ins, state_pool=pool, state_indices=idx, cu_seqlens=cu,
                                      checkpoint_every=64, checkpoint_indices=torch.tensor([[6], [-1]]),
                                      state_v_first=True, check_indices=True, backend="reference")
        b = gla_cuda.fused_recurrent_gla_verify_pooled(**dec, state_pool=pool, state_indices=didx,
                                                       state_v_first=True, check_indices=True,
                                                       backend="reference")
        return a, b

    pool = _pool(8, "cpu", True, seed=11)
    other = pool.clone()
    want = step(other)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(pool)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert torch.equal(pool, other)
