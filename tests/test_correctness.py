"""Every backend against the float64 naive recurrence: o, final state and every gradient."""

import pytest
import torch

from conftest import BACKENDS, DEVICES, HAS_CUDA, MODES, TOL, make_inputs, oracle, rel_err, runs, skip_unless_runs

GRAD_NAMES = ("q", "k", "v", "g", "initial_state")


def check(mode, backend, ins, cu_seqlens=None, output_final_state=True, dht=True, scale=None, tol=None):
    """Runs forward and (where `backend` has one) backward on `backend` and compares
    everything with the oracle."""
    skip_unless_runs(f"{mode}_fwd", backend, ins, cu_seqlens)
    has_bwd = runs(f"{mode}_bwd", backend, ins, cu_seqlens)
    tol = tol or TOL[ins["q"].dtype]
    leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
    o, ht = MODES[mode](**leaves, scale=scale, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, backend=backend)
    assert o.dtype == ins["v"].dtype and o.shape == ins["v"].shape
    assert (ht is not None) == output_final_state

    do = torch.randn_like(o)
    dht_t = torch.randn_like(ht) if (ht is not None and dht) else None
    ref_o, ref_ht, ref_grads = oracle(ins, scale, cu_seqlens, do, dht_t)
    errors = {"o": rel_err(o, ref_o)}
    if ht is not None:
        assert ht.dtype == torch.float32
        errors["ht"] = rel_err(ht, ref_ht)

    if not has_bwd:  # forcing this backend for the backward would raise: forward only
        assert all(e <= tol for e in errors.values()), f"errors over {tol}: {errors}"
        return errors
    loss = (o * do).sum() + ((ht * dht_t).sum() if dht_t is not None else 0)
    loss.backward()
    for name, ref in zip(GRAD_NAMES, ref_grads):
        if name in leaves:
            grad = leaves[name].grad
            assert grad is not None and grad.dtype == ins[name].dtype, name
            errors[f"d{name}"] = rel_err(grad, ref)
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"errors over {tol}: {bad} (all: {errors})"
    return errors


SHAPES = [(T, K, V) for T in (1, 63, 64, 65, 300) for K, V in ((16, 16), (64, 64), (128, 64), (100, 200))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,K,V", SHAPES)
def test_shapes(device, backend, mode, T, K, V):
    ins = make_inputs(2, T, 2, K, V, device=device, h0=True)
    check(mode, backend, ins)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g_fp32", [True, False])
@pytest.mark.parametrize("h0", [True, False])
def test_dtypes(device, backend, mode, dtype, g_fp32, h0):
    ins = make_inputs(2, 65, 2, 64, 64, dtype=dtype, device=device, h0=h0,
                      g_dtype=torch.float32 if g_fp32 else dtype)
    check(mode, backend, ins)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h0", [True, False])
def test_varlen(device, backend, mode, dtype, h0):
    """Packed sequences of lengths 0, 1, 69, 130 and 60, each from its own state."""
    cu = torch.tensor([0, 0, 1, 70, 200, 260], dtype=torch.int32, device=device)
    ins = make_inputs(1, 260, 2, 64, 64, dtype=dtype, device=device, h0=h0, N=5)
    check(mode, backend, ins, cu_seqlens=cu)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "auto"])
@pytest.mark.parametrize("K,V,dtype,g_dtype,gate,varlen", [
    (128, 128, torch.bfloat16, torch.float32, "normal", False),
    (128, 64, torch.bfloat16, torch.bfloat16, "mixed", True),
    (64, 64, torch.float16, torch.float16, "normal", True),
    (256, 128, torch.float16, torch.float32, "strong", False),
    (128, 512, torch.bfloat16, torch.float32, "zero", False),
])
def test_segment_split(backend, K, V, dtype, g_dtype, gate, varlen):
    """Few (sequence, head) tiles and long sequences: the compiled forward cuts every sequence
    into segments of 320 tokens whose end states a first pass computes (on any GPU with 8 SMs
    or more), and the compiled backward's state-gradient walk into segments of its own whose
    start gradients a first pass computes; outputs and gradients still match the oracle."""
    cu = torch.tensor([0, 700, 701, 1500, 2100], dtype=torch.int32, device="cuda") if varlen else None
    ins = make_inputs(1, 2100 if varlen else 1300, 1, K, V, dtype=dtype, g_dtype=g_dtype, device="cuda",
                      h0=True, N=4 if varlen else 1, gate=gate)
    check("chunk", backend, ins, cu_seqlens=cu)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("walk", ["default", "mma.sync"])
@pytest.mark.parametrize("gate", ["normal", "mixed"])
@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_two_stage_k256(monkeypatch, walk, gate, backend):
    """K = 256 runs the compiled two-stage forward: the scores and gated operands of every
    chunk in parallel, then the walk down the sequence (wgmma on sm_90; GLA_CUDA_NO_WGMMA=1
    forces the mma.sync walk of other GPUs). Varlen with an empty and a one-token sequence,
    eight V tiles, strong gates in one head (mixed: the exact scores). auto: the Triton
    backward takes the compiled forward's intermediates (bf16 at K 256)."""
    if walk == "mma.sync":
        monkeypatch.setenv("GLA_CUDA_NO_WGMMA", "1")
    cu = torch.tensor([0, 0, 1, 70, 200, 330], dtype=torch.int32, device="cuda")
    ins = make_inputs(1, 330, 2, 256, 512, dtype=torch.bfloat16, g_dtype=torch.float32, device="cuda",
                      h0=True, N=5, gate=gate)
    check("chunk", backend, ins, cu_seqlens=cu)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype,g_dtype,gate,V,varlen", [
    (torch.bfloat16, torch.bfloat16, "normal", 128, False),
    (torch.bfloat16, torch.float32, "mixed", 256, True),
    (torch.float16, torch.float32, "strong", 128, True),
    (torch.float16, torch.float16, "zero", 512, False),
])
def test_fused_sm90_k128(dtype, g_dtype, gate, V, varlen):
    """The warp-specialised Hopper forward at K = 128 (csrc/chunk_fwd/chunk_fwd_fused_sm90.cu),
    the inference forward there (other GPUs run the mma.sync kernel): varlen with an empty and a one-token sequence, sequences
    long enough to be split into segments, every gate regime, several V tiles."""
    from gla_cuda.backends import cuda as cuda_backend
    cu = torch.tensor([0, 0, 1, 70, 1300], dtype=torch.int32, device="cuda") if varlen else None
    ins = make_inputs(1 if varlen else 2, 1300 if varlen else 700, 1, 128, V, dtype=dtype, g_dtype=g_dtype,
                      device="cuda", h0=True, N=4 if varlen else None, gate=gate)
    o, ht = cuda_backend.chunk_fwd(ins["q"], ins["k"], ins["v"], ins["g"], 128 ** -0.5, ins["initial_state"],
                                   True, cu)
    ref_o, ref_ht = oracle(ins, None, cu)
    errors = {"o": rel_err(o, ref_o), "ht": rel_err(ht, ref_ht)}
    assert all(e <= TOL[dtype] for e in errors.values()), errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gate", ["zero", "strong", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_gates(device, backend, mode, gate, dtype):
    """g = 0 (no decay), g ≈ −20 per step (every exponent must stay <= 0) and strong gates in
    one chunk of one head only (the kernels pick the exact path per chunk and head). In float16,
    factors like exp(−20) lie below its range: no kernel may round them to it. g is float32
    there, as float16 training keeps it: dg of such gates (|dg| ~ 1e-8) has no float16 value."""
    ins = make_inputs(2, 130, 2, 64, 64, dtype=dtype, device=device, h0=True, gate=gate,
                      g_dtype=torch.float32 if dtype == torch.float16 else dtype)
    check(mode, backend, ins)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_without_final_state(device, backend, mode):
    ins = make_inputs(2, 100, 2, 64, 64, dtype=torch.bfloat16, device=device)
    check(mode, backend, ins, output_final_state=False, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_chunk_matches_recurrent_int64_offsets(device, mode):
    """int64 cu_seqlens and the default backend choice."""
    cu = torch.tensor([0, 5, 5, 77], dtype=torch.int64, device=device)
    ins = make_inputs(1, 77, 3, 16, 24, device=device, h0=True, N=3)
    check(mode, None, ins, cu_seqlens=cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,V,gate", [(2, 16, 16, "normal"), (16, 100, 136, "normal"),
                                         (16, 100, 136, "strong"), (3, 256, 72, "strong")])
def test_short_recurrent(device, backend, T, K, V, gate):
    """Decoding-sized inputs: all the CUDA recurrent backward takes (T <= 16); K up to 256,
    several V tiles."""
    ins = make_inputs(2, T, 1, K, V, dtype=torch.bfloat16, device=device, h0=True, gate=gate)
    check("recurrent", backend, ins)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_short_recurrent_varlen(device, backend):
    cu = torch.tensor([0, 0, 1, 7, 12], dtype=torch.int32, device=device)
    ins = make_inputs(1, 12, 2, 64, 72, device=device, h0=True, N=4)
    check("recurrent", backend, ins, cu_seqlens=cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["batch", "varlen", "split", "split_fp16"])
def test_chunk_backward_deterministic(device, backend, layout):
    """Two backward passes on the same inputs give bitwise-identical gradients (several V
    tiles, so that partial sums over tiles are involved; no float atomics). split: one head of
    one long sequence, whose compiled state-gradient walk runs in segments (4 walks: 3 to 5
    segments on a GPU with 6 SMs or more), in bf16 and float16."""
    if layout.startswith("split") and device == "cpu":
        pytest.skip("long sequences: the GPU run covers them")
    cu = torch.tensor([0, 70, 200, 333], dtype=torch.int32, device=device) if layout == "varlen" else None
    B, T, H, N = {"batch": (2, 333, 2, 2), "varlen": (1, 333, 2, 3)}.get(layout, (1, 1300, 1, 1))
    ins = make_inputs(B, T, H, 128, 128 if layout.startswith("split") else 192, device=device, h0=True, N=N,
                      dtype=torch.float16 if layout == "split_fp16" else torch.bfloat16)
    if device == "cpu" and backend == "triton":
        pytest.skip("slow under the Triton interpreter; the GPU run covers Triton")
    skip_unless_runs("chunk_bwd", backend, ins, cu)
    q, k, v, g, h0 = (ins[n] for n in ("q", "k", "v", "g", "initial_state"))
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    first = torch.ops.gla.chunk_bwd(q, k, v, g, 0.1, h0, cu, do, dht, backend)
    second = torch.ops.gla.chunk_bwd(q, k, v, g, 0.1, h0, cu, do, dht, backend)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"
