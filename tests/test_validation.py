"""Bad input gets a Python exception that names the argument; odd layouts still work."""
import pytest
import torch

import gla_cuda
from gla_cuda import dispatch
from conftest import DEVICES, HAS_CUDA, MODES, TOL, make_inputs, oracle, rel_err


def good(B=2, T=10, H=2, K=8, V=6, **kw):
    return make_inputs(B, T, H, K, V, **kw)


def call(fn=gla_cuda.chunk_gla, **kw):
    args = good()
    args.update(kw)
    return fn(**args)


@pytest.mark.parametrize("fn", MODES.values())
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=torch.randn(2, 10, 8)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(2, 10, 2, 7)), ValueError, "k must have q's shape"),
    (dict(g=torch.randn(2, 11, 2, 8)), ValueError, "g must have q's shape"),
    (dict(v=torch.randn(2, 10, 3, 6)), ValueError, "v must be"),
    (dict(v=torch.randn(2, 10, 2)), ValueError, "v must be 4-D"),
    (dict(k=torch.randn(2, 10, 2, 8, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    (dict(v=torch.randn(2, 10, 2, 6, dtype=torch.bfloat16)), TypeError, "v must have q's dtype"),
    (dict(g=torch.randn(2, 10, 2, 8, dtype=torch.float16)), TypeError, "g must be float32 or q's dtype"),
    (dict(q=torch.randint(0, 3, (2, 10, 2, 8))), TypeError, "q must be float16"),
    (dict(q="x"), TypeError, "q must be a Tensor"),
    (dict(initial_state=torch.randn(2, 2, 8, 5)), ValueError, "initial_state must have shape"),
    (dict(initial_state=torch.randn(2, 2, 8, 6, dtype=torch.float16)), TypeError, "initial_state must be float32"),
    (dict(initial_state=torch.randn(2, 2, 8, 6, dtype=torch.float64)), TypeError, "initial_state must be float32"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(scale="0.5"), TypeError, "scale must be a real number"),
    (dict(cu_seqlens=torch.tensor([0, 10])), ValueError, "batch size 1"),
    (dict(backend="flash"), ValueError, "backend must be one of"),
])
def test_bad_arguments(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        call(fn, **kwargs)


@pytest.mark.parametrize("fn", MODES.values())
@pytest.mark.parametrize("cu,match", [
    (torch.tensor([[0, 10]]), "1-D int32 or int64"),
    (torch.tensor([0.0, 10.0]), "1-D int32 or int64"),
    (torch.tensor([1, 10]), "must start at 0"),
    (torch.tensor([0, 6, 4, 10]), "non-decreasing"),
    (torch.tensor([0, 4, 9]), "must end at the packed length"),
    (torch.tensor([], dtype=torch.int64), "at least one offset"),
    ([0, 10], "cu_seqlens must be a Tensor"),
])
def test_bad_cu_seqlens(fn, cu, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**good(B=1), cu_seqlens=cu)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_mixed_devices():
    ins = good()
    ins["v"] = ins["v"].cuda()
    with pytest.raises(ValueError, match="v is on cuda"):
        gla_cuda.chunk_gla(**ins)


def test_mixed_devices_meta():
    """Mixed devices are refused before any kernel runs (meta stands in for a second device)."""
    ins = good()
    ins["g"] = ins["g"].to("meta")
    with pytest.raises(ValueError, match="g is on meta"):
        gla_cuda.chunk_gla(**ins)


def test_forced_backend_that_cannot_run_says_why():
    ins = good()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run chunk_fwd on these inputs: ") as e:
        gla_cuda.chunk_gla(**ins, backend="cuda")
    assert "\n" not in str(e.value) and "reference" not in str(e.value)  # one sentence, not the table


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors on a machine without a GPU")
def test_forced_triton_on_cpu_says_it_needs_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET a forced Triton backend names the reason, in one sentence."""
    from gla_cuda.backends import triton as tr
    if tr.IMPORT_ERROR:
        pytest.skip(tr.IMPORT_ERROR)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ins = good()
    for fn, op in ((gla_cuda.chunk_gla, "chunk_fwd"), (gla_cuda.fused_recurrent_gla, "recurrent_fwd")):
        with pytest.raises(RuntimeError) as e:
            fn(**ins, backend="triton")
        assert str(e.value) == (f"gla_cuda: backend 'triton' cannot run {op} on these inputs: "
                                "CPU tensors need TRITON_INTERPRET=1")
    ins = {n: x.double() for n, x in good().items()}
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run chunk_fwd on these inputs: "
                                           "float64 runs only on the reference"):
        gla_cuda.chunk_gla(**ins, backend="triton")


def test_auto_with_no_backend_keeps_the_table(monkeypatch):
    """Under "auto", when no backend runs the inputs, the error lists every backend's reason."""
    from gla_cuda.backends import reference
    monkeypatch.setattr(reference, "unsupported_reason", lambda *a: "refused for this test")
    dispatch._CHOICES.clear()
    try:
        with pytest.raises(RuntimeError, match="no backend can run chunk_fwd on these inputs") as e:
            gla_cuda.chunk_gla(**good())
        text = str(e.value)
        assert all(name in text for name in gla_cuda.BACKENDS) and "refused for this test" in text
    finally:
        dispatch._CHOICES.clear()


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("GLA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        call()
    monkeypatch.setenv("GLA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GLA_BACKEND must be one of"):
        call()
    monkeypatch.setenv("GLA_BACKEND", "reference")
    assert gla_cuda.explain_backend(**good()).backend == "reference"


def test_explain_backend_names_every_backend():
    ins = good()
    choice = gla_cuda.explain_backend(ins["q"], ins["k"], ins["v"], ins["g"])
    assert choice.backend == "reference"
    assert set(choice.reasons) == set(gla_cuda.BACKENDS)
    assert choice.reasons["cuda"]  # a CPU tensor never runs the CUDA kernels; the reason is given
    text = str(choice)
    for name in gla_cuda.BACKENDS:
        assert name in text
    with pytest.raises(ValueError, match="op must be one of"):
        gla_cuda.explain_backend(**ins, op="nope")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", MODES.values())
def test_non_contiguous_inputs(device, fn):
    """Transposed, strided views give the same result as contiguous copies."""
    base = make_inputs(2, 70, 2, 16, 16, device=device, h0=True)
    # [B, H, T, D] storage viewed as [B, T, H, D]; every other channel of a wider v
    q, k, g = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (base["q"], base["k"], base["g"]))
    v = torch.cat([base["v"], base["v"]], -1)[..., ::2]
    h0 = base["initial_state"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (q.is_contiguous() or v.is_contiguous() or h0.is_contiguous())
    o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=True)
    ref_o, ref_ht = oracle(dict(q=q, k=k, v=v, g=g, initial_state=h0))
    assert rel_err(o, ref_o) < TOL[torch.float32] and rel_err(ht, ref_ht) < TOL[torch.float32]


@pytest.mark.parametrize("fn", MODES.values())
def test_empty_sequence_batch(fn):
    """T = 0: an empty output, and the final state is the initial state."""
    ins = make_inputs(2, 0, 2, 8, 8, h0=True)
    o, ht = fn(**ins, output_final_state=True)
    assert o.shape == (2, 0, 2, 8)
    torch.testing.assert_close(ht, ins["initial_state"])


def test_auto_skip_leaves_inputs_to_the_next_backend(monkeypatch):
    """A backend's auto_skip_reason passes inputs on under "auto" (and says why); forcing
    that backend still runs it."""
    from gla_cuda.backends import reference
    ins = good()
    monkeypatch.setattr(reference, "auto_skip_reason", lambda op, *a: "slower here" if op == "chunk_fwd" else None,
                        raising=False)
    choice = gla_cuda.explain_backend(**ins)
    assert choice.backend is None and choice.reasons["reference"] == "slower here"
    assert gla_cuda.explain_backend(**ins, op="recurrent_fwd").backend == "reference"
    assert gla_cuda.explain_backend(**ins, backend="reference").backend == "reference"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [None, "cuda", "triton", "reference"])
@pytest.mark.parametrize("op", ["chunk_fwd", "chunk_bwd", "recurrent_fwd"])
def test_per_call_choice_matches_the_full_one(device, backend, op):
    """Op calls stop at the backend that runs (choose(full=False)); they pick what the full
    report picks, and the report of such a choice marks the skipped backends."""
    from gla_cuda import dispatch
    ins = good(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    args = (op, ins["q"], ins["k"], ins["v"], ins["g"], ins.get("initial_state"), None, backend)
    full, fast = dispatch.choose(*args), dispatch.choose(*args, full=False)
    assert fast.backend == full.backend
    assert all(fast.reasons[n] == full.reasons[n] for n in fast.reasons)
    if fast.backend is not None and len(fast.reasons) < len(dispatch.BACKENDS):
        assert "not evaluated" in str(fast)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("K", [64, 128, 256])
def test_auto_backend_rules(K):
    """auto: the compiled chunked forward wherever it covers the inputs, and the compiled
    backward (bf16 and float16) at K 64 and 128, where it was measured faster than Triton's; at
    K 256 the Triton backward, measured faster there, takes the compiled forward's
    intermediates (forcing cuda runs the compiled one)."""
    from gla_cuda import dispatch
    ins = make_inputs(1, 64, 2, K, 64, dtype=torch.bfloat16, device="cuda")
    if gla_cuda.explain_backend(**ins, op="chunk_bwd", backend="cuda").backend is None:
        pytest.skip("the cuda backend cannot run chunk_bwd here")
    bwd = gla_cuda.explain_backend(**ins, op="chunk_bwd")
    assert bwd.backend == ("cuda" if K <= 128 else "triton")
    assert K <= 128 or "Triton backward is faster" in bwd.reasons["cuda"]
    assert gla_cuda.explain_backend(**ins, op="chunk_fwd").backend == "cuda"
    assert dispatch.saving_backend(ins["q"], ins["k"], ins["v"], ins["g"]) == "cuda"
    half = make_inputs(1, 64, 2, K, 64, dtype=torch.float16, device="cuda")
    assert gla_cuda.explain_backend(**half, op="chunk_bwd").backend == ("cuda" if K <= 128 else "triton")
    assert gla_cuda.explain_backend(**half, op="chunk_bwd", backend="cuda").backend == "cuda"


# ----------------------------------------------------------------------------
# Every argument of every public function, and rejected calls write nothing
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fn", MODES.values())
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(output_final_state=torch.tensor(True)), TypeError, "output_final_state must be a bool"),
    (dict(output_final_state="yes"), TypeError, "output_final_state must be a bool"),
    (dict(scale=True), TypeError, "scale must be a real number"),
    (dict(scale=torch.tensor(0.5)), TypeError, "scale must be a real number"),
    (dict(scale=-float("inf")), ValueError, "scale must be finite"),
    (dict(initial_state=[0.0]), TypeError, "initial_state must be a Tensor"),
    (dict(initial_state=torch.randn(2, 2, 8, 6).to("meta")), ValueError, "initial_state is on meta"),
    (dict(cu_seqlens_cpu=torch.tensor([0, 10])), ValueError, "pass cu_seqlens too"),
    (dict(backend=3), ValueError, "backend must be one of"),
    (dict(k="k"), TypeError, "k must be a Tensor"),
    (dict(g=None), TypeError, "g must be a Tensor"),
])
def test_more_bad_arguments(fn, kwargs, exc, match):
    if fn is gla_cuda.fused_recurrent_gla and "g" in kwargs and kwargs["g"] is None:
        pytest.skip("fused_recurrent_gla takes g=None as fla does: no key gate (tests/test_fla_options.py)")
    with pytest.raises(exc, match=match):
        call(fn, **kwargs)


@pytest.mark.parametrize("fn", MODES.values())
def test_head_dim_zero_names_K(fn):
    with pytest.raises(ValueError, match="head dim K >= 1"):
        fn(**make_inputs(2, 4, 2, 0, 3))


@pytest.mark.parametrize("fn", MODES.values())
@pytest.mark.parametrize("cu_cpu,match", [
    (torch.tensor([0, 4, 10]).cuda() if HAS_CUDA else torch.tensor([0, 4, 10]).to("meta"), "must be on the CPU"),
    (torch.tensor([0, 10]), "of cu_seqlens' shape"),
    (torch.tensor([0.0, 4.0, 10.0]), "1-D int32 or int64"),
    (torch.tensor([0, 6, 4]), r"cu_seqlens_cpu must be non-decreasing, got cu_seqlens_cpu\[1\] = 6"),
    (torch.tensor([0, 4, 9]), "cu_seqlens_cpu must end at the packed length"),
    ([0, 4, 10], "cu_seqlens_cpu must be a Tensor"),
])
def test_bad_cu_seqlens_cpu(fn, cu_cpu, match):
    """The host copy of the offsets is checked instead of the offsets themselves."""
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**good(B=1), cu_seqlens=torch.tensor([0, 4, 10]), cu_seqlens_cpu=cu_cpu)


@pytest.mark.parametrize("fn", MODES.values())
def test_cu_seqlens_cpu_is_used(fn):
    ins = good(B=1)
    cu = torch.tensor([0, 4, 10])
    o, ht = fn(**ins, cu_seqlens=cu, cu_seqlens_cpu=cu.clone(), output_final_state=True)
    ref_o, ref_ht = oracle(ins, cu_seqlens=cu)
    assert rel_err(o, ref_o) < TOL[torch.float32] and ht.shape == (2, 2, 8, 6)


def test_bad_cu_seqlens_names_the_offending_pair():
    with pytest.raises(ValueError, match=r"cu_seqlens\[1\] = 6 > cu_seqlens\[2\] = 4"):
        gla_cuda.chunk_gla(**good(B=1), cu_seqlens=torch.tensor([0, 6, 4, 10]))


def pooled_args(B=3, T=1, H=2, K=8, V=6, P=4):
    ins = make_inputs(B, T, H, K, V)
    ins.update(state_pool=torch.randn(P, H, K, V), state_index=torch.tensor([2, -1, 0])[:B])
    return ins


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(state_pool=[1.0]), TypeError, "state_pool must be a Tensor"),
    (dict(state_pool=torch.randn(4, 2, 8, 6, dtype=torch.float64)), TypeError, "state_pool must be float32"),
    (dict(state_pool=torch.randn(4, 2, 6, 8)), ValueError, r"state_pool must have shape \[P, H, K, V\]"),
    (dict(state_pool=torch.randn(4, 2, 8, 6), state_v_first=True), ValueError, r"\[P, H, V, K\]"),
    (dict(state_pool=torch.randn(4, 2, 6, 8).transpose(-1, -2)), ValueError, "state_pool must be contiguous"),
    (dict(state_pool=torch.randn(4, 2, 8, 6, requires_grad=True)), ValueError, "must not require grad"),
    (dict(state_pool=torch.randn(4, 2, 8, 6).to("meta")), ValueError, "state_pool is on meta"),
    (dict(state_index=[0, 1, 2]), TypeError, "state_index must be a Tensor"),
    (dict(state_index=torch.tensor([0.0, 1.0, 2.0])), ValueError, "state_index must be an int32 or int64"),
    (dict(state_index=torch.tensor([0, 1])), ValueError, r"of shape \[B\] = \[3\]"),
    (dict(state_index=torch.tensor([0, 1, 2]).to("meta")), ValueError, "state_index is on meta"),
    (dict(state_index=torch.tensor([0, 4, 1])), ValueError, r"got 4 \(state_index\[1\]\)"),
    (dict(state_index=torch.tensor([0, -2, 1])), ValueError, r"in \[-1, P\)"),
    (dict(state_index=torch.tensor([1, -1, 1])), ValueError, "uses a pool slot twice: slot 1"),
    (dict(state_v_first="no"), TypeError, "state_v_first must be a bool"),
    (dict(check_index=None), TypeError, "check_index must be a bool"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(q=torch.randn(3, 1, 2, 7)), ValueError, "k must have q's shape"),
])
def test_pooled_bad_arguments_write_nothing(kwargs, exc, match):
    args = pooled_args()
    args.update(kwargs)
    pool = args["state_pool"]
    before = pool.detach().clone() if isinstance(pool, torch.Tensor) and pool.device.type != "meta" else None
    with pytest.raises(exc, match=match):
        gla_cuda.fused_recurrent_gla_pooled(**args)
    if before is not None:
        assert torch.equal(pool.detach(), before), "a rejected call wrote to the pool"


def test_pooled_forced_backend_that_cannot_run_writes_nothing():
    args = pooled_args()
    before = args["state_pool"].clone()
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run recurrent_pool_fwd_"):
        gla_cuda.fused_recurrent_gla_pooled(**args, backend="triton")
    assert torch.equal(args["state_pool"], before)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=torch.randn(2, 10, 2)), ValueError, "q must be 4-D"),
    (dict(v=torch.randn(2, 10, 3, 6)), ValueError, "v must be"),
    (dict(initial_state=torch.randn(2, 2, 8, 5)), ValueError, "initial_state must have shape"),
    (dict(cu_seqlens=torch.tensor([0, 10])), ValueError, "batch size 1"),
    (dict(backend="none"), ValueError, "backend must be one of"),
    (dict(op=7), ValueError, "op must be one of"),
    (dict(op="recurrent_pool_fwd_"), ValueError, "pass the state pool"),
])
def test_explain_backend_checks_its_arguments(kwargs, exc, match):
    args = good()
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        gla_cuda.explain_backend(**args)


@pytest.mark.parametrize("name,sizes", [("B", (0, 4, 2, 8, 6)), ("T", (2, 0, 2, 8, 6)), ("H", (2, 4, 0, 8, 6)),
                                        ("V", (2, 4, 2, 8, 0))])
def test_explain_backend_says_empty_inputs_run_no_kernel(name, sizes):
    choice = gla_cuda.explain_backend(**make_inputs(*sizes))
    assert choice.backend == "empty"
    assert f"{name} = 0" in str(choice) and "without launching a kernel" in str(choice)


def test_gpu_offsets_are_not_read_by_default(monkeypatch):
    """Offsets on the GPU are not read on the host (a stall) unless their host copy is given
    or GLA_CHECK_CU_SEQLENS=1; CPU offsets are always checked (stands in for a GPU tensor: a
    CPU tensor whose device type claims cuda is not possible, so the check is driven directly)."""
    from gla_cuda import api
    bad = torch.tensor([0, 6, 4, 10])

    class Reads(Exception):
        pass

    class Offsets(torch.Tensor):
        def tolist(self):
            raise Reads

    fake = bad.as_subclass(Offsets)
    monkeypatch.setattr(api, "_is_tracing", lambda: False)
    with pytest.raises(Reads):  # a CPU tensor is read
        api._check_cu_seqlens(fake, 1, 10)
    # a GPU tensor is not, unless asked for (the device check reads .device only)
    monkeypatch.setattr(Offsets, "device", property(lambda self: torch.device("cuda", 0)), raising=False)
    api._check_cu_seqlens(fake, 1, 10)
    monkeypatch.setenv("GLA_CHECK_CU_SEQLENS", "1")
    with pytest.raises(Reads):
        api._check_cu_seqlens(fake, 1, 10)
