"""What the tests, the benchmark's accuracy gate and the main job share: random inputs, the
float64 oracle, relative error norms and the thresholds they are held to."""
from __future__ import annotations

import math

import torch

from gla_cuda.backends import reference

# Relative error thresholds ‖out − ref‖ / ‖ref‖ against the float64 oracle, per input dtype
# (the tests and the main job). float32 allows TF32 tensor-core products on the GPU.
TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# The benchmark's gate: a backend above it is not timed. Looser than TOL: its cases are
# larger, and include gates of -20 per step.
GATE_TOL = {torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 5e-2}

GATES = ("normal", "zero", "strong", "mixed")


def make_inputs(B, T, H, K, V, dtype=torch.float32, device="cpu", g_dtype=None, gate="normal", h0=False,
                N=None, seed=None, requires_grad=False) -> dict:
    """Random q, k, v, g (and with h0, an initial state for N sequences, default B) as a dict
    of chunk_gla's argument names. Drawn on ``device`` in float32 (float64 for float64
    inputs), then cast to dtype (g to g_dtype, default dtype; the state is float32, float64
    for float64 inputs). seed None: fresh values every call. gate: 'normal' (logsigmoid/16),
    'zero' (g = 0), 'strong' (≈ −20 per step), 'mixed' (normal, but ≈ −2.5 per step in 16
    channels of head 0 over tokens 64-127: too strong for one reference row per chunk there,
    so only that chunk of that head takes the exact path). requires_grad: on q, k, v, g."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    gen = torch.Generator(device=device).manual_seed(seed if seed is not None else torch.seed() % 2**31)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    r = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=draw)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    if gate == "zero":
        g = torch.zeros(B, T, H, K, device=device, dtype=draw)
    elif gate == "strong":
        g = -20 - r(B, T, H, K).abs()
    else:
        g = torch.nn.functional.logsigmoid(r(B, T, H, K)) / 16
        if gate == "mixed":
            g[:, 64:128, 0, :16] = -2.5 - 0.5 * r(B, T, K)[:, 64:128, :16].abs()
    ins = {n: x.to(dt).requires_grad_(requires_grad)
           for n, x, dt in zip("qkvg", (q, k, v, g), (dtype,) * 3 + (g_dtype or dtype,))}
    if h0:
        ins["initial_state"] = r(N or B, H, K, V).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return ins


def oracle(ins, scale=None, cu_seqlens=None, do=None, dht=None, chunked=False):
    """The float64 answer for the inputs ``ins`` (make_inputs' dict): (o, ht) and, given do,
    also the gradients (dq, dk, dv, dg, dh0). By default the naive recurrence on CPU; chunked:
    the reference's chunked form on the inputs' device, the same math, for sizes at which the
    step-by-step recurrence is slow (the benchmark's gate)."""
    dev = ins["q"].device if chunked else torch.device("cpu")
    d = {n: x.detach().to(dev, torch.float64) for n, x in ins.items()}
    f64 = lambda x: None if x is None else x.detach().to(dev, torch.float64)  # noqa: E731
    scale = d["q"].shape[-1] ** -0.5 if scale is None else scale
    cu = None if cu_seqlens is None else cu_seqlens.to(dev)
    qkvg, h0 = (d["q"], d["k"], d["v"], d["g"]), d.get("initial_state")
    fwd, bwd = (reference.chunk_fwd, reference.chunk_bwd) if chunked else (reference.naive_fwd, reference.naive_bwd)
    o, ht = fwd(*qkvg, scale, h0, True, cu)
    if do is None:
        return o, ht
    return o, ht, bwd(*qkvg, scale, h0, cu, f64(do), f64(dht))


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (‖out‖ where ref is 0); inf where out is not finite."""
    ref = ref.detach().double()
    out = out.detach().to(ref.device, torch.float64)
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float(out.norm())
