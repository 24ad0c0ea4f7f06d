"""What the benchmark runs: shapes, modes, dtypes, the candidates (our backends, fla, SDPA)
and the memory floor each mode is measured against."""
from __future__ import annotations

import torch

import gla_cuda
from gla_cuda import dispatch
from gla_cuda.testing import make_inputs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwdbwd", "bwd", "decode")
TRAIN_MODES = ("fwd", "fwdbwd", "bwd")
QUICK_MODES = ("fwd", "fwdbwd", "decode")

# The sweep: T from 1K to 32K at constant tokens per batch (B = max(1, TOKENS // T)), so a
# linear-time kernel's line stays flat while softmax attention's grows with T.
SWEEP_T = (1024, 2048, 4096, 8192, 16384, 32768)
TOKENS = 16384
HEAD_DIMS = {"64": (16, 64, 64), "128": (16, 128, 128), "256x512": (4, 256, 512)}  # name: H, K, V
QUICK_SHAPES = [(8, 2048, 16, 128, 128)]
CPU_SHAPES = [(1, 256, 2, 64, 64)]
DECODE_SHAPES = [(64, 16, 128, 128)]  # B, H, K, V: one token per sequence
QUICK_BUDGET_S = 50  # --quick stops starting measurements after this (imports and output come on top)
TIMING_RESERVE_S = 15  # under a budget, an isolated check (fla) leaves this much for the timings
REFERENCE_MAX_TOKENS = 4096  # B*T*H above which the reference is not timed on a GPU


def sweep_shapes(head_dims=tuple(HEAD_DIMS), tokens=TOKENS, seq_lens=SWEEP_T):
    return [(max(1, tokens // T), T, *HEAD_DIMS[hd]) for hd in head_dims for T in seq_lens]


# ----------------------------------------------------------------------------
# Candidates for fwd / fwdbwd / bwd: name -> fn(q, k, v, g, h0=None, final=False) -> (o, ht)
# ----------------------------------------------------------------------------

def _ours(backend):
    def run(q, k, v, g, h0=None, final=False):
        return gla_cuda.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=final, backend=backend)
    return run


def _fla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception as e:
        return None, f"fla not importable ({type(e).__name__}); pip install fla-core to compare"

    def run(q, k, v, g, h0=None, final=False):
        return chunk_gla(q, k, v, g, scale=q.shape[-1] ** -0.5, initial_state=h0, output_final_state=final)
    return run, None


def _sdpa(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]

    def run(q, k, v, g, h0=None, final=False):
        with sdpa_kernel([backend]):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2), None
    return run


def candidates(device):
    """name -> (fn or None, why not). Baselines first: every row of ours then prints its ratios."""
    if device != "cuda":
        return {"reference": (_ours("reference"), None)}
    out = {"sdpa_cudnn": (_sdpa("cudnn"), None), "sdpa_flash": (_sdpa("flash"), None), "fla": _fla(),
           "auto": (_ours(None), None)}  # auto: what a user gets, each op on its best backend
    for name in dispatch.BACKENDS:
        out[name] = (_ours(name), None)
    return out


# ----------------------------------------------------------------------------
# Decode candidates: name -> fn(q, k, v, g, state, index) -> (o, state after the step).
# q, k, v, g: [B, 1, H, *]; state: float32 [B, H, K, V] (a pooled op updates it in place);
# index: int32 arange(B), the pool slot of each row. One line adds a candidate.
# ----------------------------------------------------------------------------

def _decode_ours(backend):
    return lambda q, k, v, g, h, i: gla_cuda.fused_recurrent_gla(
        q, k, v, g, initial_state=h, output_final_state=True, backend=backend)


def _decode_pooled(backend):
    def run(q, k, v, g, h, i):
        return gla_cuda.fused_recurrent_gla_pooled(q, k, v, g, h, i, check_index=False, backend=backend), h
    return run


def _decode_fla(q, k, v, g, h, i):
    from fla.ops.gla import fused_recurrent_gla
    return fused_recurrent_gla(q, k, v, gk=g, scale=q.shape[-1] ** -0.5, initial_state=h,
                               output_final_state=True)


DECODE_CANDIDATES = {
    "fla": _decode_fla,
    "auto": _decode_ours(None),
    "cuda": _decode_ours("cuda"),
    "triton": _decode_ours("triton"),
    "reference": _decode_ours("reference"),
    "cuda_pooled": _decode_pooled("cuda"),  # in place in a state pool (serving)
}


def decode_candidates(device):
    if device != "cuda":
        return {"reference": DECODE_CANDIDATES["reference"]}
    return dict(DECODE_CANDIDATES)


def floor_bytes(B, T, H, K, V, mode, itemsize=2):
    """Bytes that must move. fwd reads q, k, v, g and writes o; bwd reads q, k, v, g, do and
    writes dq, dk, dv, dg; decode (T = 1; "graph": the same step in a CUDA graph) also reads
    and writes the float32 state once."""
    mode = "decode" if mode == "graph" else mode
    per = {"fwd": 3 * K + 2 * V, "bwd": 6 * K + 3 * V, "fwdbwd": 9 * K + 5 * V, "decode": 3 * K + 2 * V}[mode]
    state = 2 * B * H * K * V * 4 if mode == "decode" else 0
    return B * T * H * per * itemsize + state


# ----------------------------------------------------------------------------
# Accuracy cases and helpers
# ----------------------------------------------------------------------------

ACCURACY_T = 272  # 4 chunks of 64 and a partial one; a multiple of 16, as the timed T are


def accuracy_shape(shape):
    """The accuracy check of a timed shape: its B, H, K, V (Triton compiles per H, K, V and, in
    fla, per B: the check then shares the timed run's compiled kernels), T = ACCURACY_T."""
    B, T, H, K, V = shape
    return (B, ACCURACY_T, H, K, V)


def head_dim_groups(shapes):
    """(H, K, V) -> the shapes that have them, in order."""
    groups = {}
    for s in shapes:
        groups.setdefault(tuple(s[2:]), []).append(tuple(s))
    return groups


def has_backward(name, device):
    """Whether one of our backends runs chunk_bwd on the benchmark's inputs (fla: yes)."""
    if name not in dispatch.BACKENDS:
        return True
    x = torch.empty(1, 1, 1, 64, device=device, dtype=torch.bfloat16)
    return dispatch.choose("chunk_bwd", x, x, x, x, backend=name).backend is not None


def usable_modes(name, device, modes):
    return modes if has_backward(name, device) else [m for m in modes if m == "fwd"]


def dtype_name(dtype):
    return next(n for n, d in DTYPES.items() if d == dtype)


def qkvg(B, T, H, K, V, device, dtype=torch.bfloat16, gate="normal", requires_grad=False, seed=0, g_dtype=None):
    """q, k, v, g (gla_cuda.testing.make_inputs, seeded: every run times the same values)."""
    ins = make_inputs(B, T, H, K, V, dtype=dtype, device=device, g_dtype=g_dtype, gate=gate, seed=seed,
                      requires_grad=requires_grad)
    return [ins[n] for n in "qkvg"]
