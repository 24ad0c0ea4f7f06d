"""Shared test helpers: devices, backends, thresholds, inputs and the float64 oracle.

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, set
here before anything imports Triton.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The compiled kernels fill their outputs with NaN before each launch: unwritten elements fail.
os.environ.setdefault("GLA_DEBUG_POISON", "1")
# The CPU cases are small: one thread avoids oversubscription, which slows them many times over.
torch.set_num_threads(1)

import gla_cuda  # noqa: E402
from gla_cuda import dispatch  # noqa: E402
from gla_cuda.backends import reference  # noqa: E402

# Relative error thresholds ‖out − ref‖ / ‖ref‖ against the float64 oracle, per input dtype.
# float32 allows TF32 tensor-core products on the GPU.
TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# GLA_TEST_DEVICES=cuda runs only the GPU half (the device script does; CI covers the CPU half).
_ALL_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"))]
_WANTED = os.environ.get("GLA_TEST_DEVICES", "cpu,cuda").split(",")
DEVICES = [d for d in _ALL_DEVICES if (d if isinstance(d, str) else d.values[0]) in _WANTED]
BACKENDS = list(dispatch.BACKENDS)
MODES = {"chunk": gla_cuda.chunk_gla, "recurrent": gla_cuda.fused_recurrent_gla}


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float(out.norm())


def make_inputs(B, T, H, K, V, dtype=torch.float32, device="cpu", g_dtype=None, gate="normal",
                h0=False, N=None, seed=None):
    """Fresh random inputs. gate: 'normal' (logsigmoid/16), 'zero' (g = 0), 'strong' (≈ −20),
    'mixed' (normal, but ≈ −2.5 per step in 16 channels of head 0 over tokens 64-127: too strong
    for one reference row per chunk there, so only that chunk of that head takes the exact path)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    if gate == "normal":
        g = torch.nn.functional.logsigmoid(r(B, T, H, K)) / 16
    elif gate == "zero":
        g = torch.zeros(B, T, H, K, dtype=torch.float64)
    elif gate == "strong":
        g = -20 + r(B, T, H, K).abs().neg()
    elif gate == "mixed":
        g = torch.nn.functional.logsigmoid(r(B, T, H, K)) / 16
        g[:, 64:128, 0, :16] = -2.5 - 0.5 * r(B, T, K)[:, 64:128, :16].abs()
    else:
        raise ValueError(gate)
    to = lambda x, dt: x.to(dtype=dt, device=device)
    ins = dict(q=to(q, dtype), k=to(k, dtype), v=to(v, dtype), g=to(g, g_dtype or dtype))
    if h0:
        ins["initial_state"] = to(r(N or B, H, K, V), torch.float64 if dtype == torch.float64 else torch.float32)
    return ins


def oracle(ins, scale=None, cu_seqlens=None, do=None, dht=None):
    """float64 naive recurrence: (o, ht) and, given do, the gradients (dq, dk, dv, dg, dh0)."""
    d = {k: v.detach().double().cpu() for k, v in ins.items()}
    K = d["q"].shape[-1]
    scale = K ** -0.5 if scale is None else scale
    cu = cu_seqlens.cpu() if cu_seqlens is not None else None
    o, ht = reference.naive_fwd(d["q"], d["k"], d["v"], d["g"], scale, d.get("initial_state"), True, cu)
    if do is None:
        return o, ht
    grads = reference.naive_bwd(d["q"], d["k"], d["v"], d["g"], scale, d.get("initial_state"), cu,
                                do.double().cpu(), None if dht is None else dht.double().cpu())
    return o, ht, grads


def _choice(op, backend, ins, cu_seqlens):
    return dispatch.choose(op, ins["q"], ins["k"], ins["v"], ins["g"], ins.get("initial_state"),
                           cu_seqlens, backend)


def runs(op, backend, ins, cu_seqlens=None) -> bool:
    return _choice(op, backend, ins, cu_seqlens).backend is not None


def skip_unless_runs(op, backend, ins, cu_seqlens=None):
    choice = _choice(op, backend, ins, cu_seqlens)
    if choice.backend is None:
        pytest.skip(f"{backend} cannot run {op}: {choice.reasons.get(backend)}")
