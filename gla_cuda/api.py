"""The public functions: validate the arguments, then call torch.ops.gla.

Layout and semantics follow flash-linear-attention (DESIGN §1), so these are
drop-in replacements for ``fla.ops.gla.chunk_gla`` and ``fused_recurrent_gla``.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from gla_cuda import dispatch, ops  # noqa: F401  (ops defines torch.ops.gla)

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_tracing() -> bool:
    """True while values cannot (or must not) be read on the host."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_cu_seqlens(cu_seqlens: Tensor, B: int, T: int) -> None:
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32 or int64 tensor, got "
                         f"{cu_seqlens.dim()}-D {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if B != 1:
        raise ValueError(f"with cu_seqlens, q must have batch size 1 (packed sequences), got B={B}")
    if _is_tracing():
        return  # reading the values would synchronise: the caller vouches for them here
    # One host read: the values decide whether the call is valid at all.
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if bounds[-1] != T:
        raise ValueError(f"cu_seqlens must end at the packed length T={T}, got {bounds[-1]}")


def _check_initial_state(initial_state, q: Tensor, N: int, V: int) -> Tensor:
    """initial_state: float32 [N, H, K, V] (float64 too for float64 inputs); returned contiguous."""
    H, K = q.shape[2], q.shape[3]
    if not isinstance(initial_state, Tensor):
        raise TypeError(f"initial_state must be a Tensor, got {type(initial_state).__name__}")
    state_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if initial_state.dtype not in state_dtypes:
        raise TypeError(f"initial_state must be float32, got {initial_state.dtype}")
    if tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state must have shape [N, H, K, V] = {(N, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    if initial_state.device != q.device:
        raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return initial_state.contiguous()


def _prepare(q, k, v, g, scale, initial_state, cu_seqlens):
    """Checks every argument (naming it in the error) and returns contiguous tensors."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
    if q.dtype not in _INPUT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if g.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"g must be float32 or q's dtype {q.dtype}, got {g.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"g must have q's shape {tuple(q.shape)}, got {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    named = [("k", k), ("v", v), ("g", g), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)]
    for name, x in named:
        if isinstance(x, Tensor) and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")

    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, B, T)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1

    if scale is None:
        scale = K ** -0.5  # may be symbolic under torch.compile(dynamic=True); always finite
    else:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")

    if initial_state is not None:
        initial_state = _check_initial_state(initial_state, q, N, V)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    return q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale, initial_state, cu_seqlens


def _call(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    q, k, v, g, scale, initial_state, cu_seqlens = _prepare(q, k, v, g, scale, initial_state, cu_seqlens)
    return _launch(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend)


def _launch(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    """Runs ``op`` on arguments _prepare has checked (or that are valid by construction)."""
    backend = dispatch.requested_backend(backend)
    if op is torch.ops.gla.chunk_fwd and torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, g, initial_state)):
        op = ops.chunk_fwd_train  # may keep intermediates for the backward
    o, final_state = op(q, k, v, g, scale, initial_state, bool(output_final_state), cu_seqlens, backend)[:2]
    return o, (final_state if output_final_state else None)


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              cu_seqlens: Optional[Tensor] = None, backend: Optional[str] = None):
    """Gated linear attention in the chunkwise-parallel form.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; g is the log-space forget gate (g <= 0).
    Returns (o [B, T, H, V] in v's dtype, final state float32 [N, H, K, V] or None).
    backend: "cuda", "triton", "reference" or None/"auto" (default: $GLA_BACKEND or auto).
    """
    return _call(torch.ops.gla.chunk_fwd, q, k, v, g, scale, initial_state, output_final_state,
                 cu_seqlens, backend)


def fused_recurrent_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: Optional[float] = None,
                        initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                        cu_seqlens: Optional[Tensor] = None, backend: Optional[str] = None):
    """Gated linear attention as a step-by-step recurrence (decoding, short inputs).

    Same arguments and results as chunk_gla.
    """
    return _call(torch.ops.gla.recurrent_fwd, q, k, v, g, scale, initial_state, output_final_state,
                 cu_seqlens, backend)


def fused_recurrent_gla_pooled(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state_pool: Tensor,
                               state_index: Tensor, scale: Optional[float] = None,
                               state_v_first: bool = False, check_index: bool = True,
                               backend: Optional[str] = None) -> Tensor:
    """One decode step (or a few tokens) for a batch whose states live in a shared pool.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]. state_pool: float32 [P, H, K, V] ([P, H, V, K]
    with state_v_first), updated in place: row b starts from state_pool[state_index[b]] and
    leaves its final state there. state_index: int32/int64 [B] on the pool's device; -1
    means "no state": the row is skipped (its output is zeros, the pool is not touched).
    Returns o [B, T, H, V].

    check_index reads state_index once on the host (one synchronisation) to reject values
    outside [-1, P) and slots used twice, before anything is written. Pass False in a
    serving loop; under CUDA-graph capture and torch.compile the check is skipped anyway.
    Unchecked, an index outside [0, P) is skipped like -1; a slot used twice is undefined.
    """
    q, k, v, g, scale, _, _ = _prepare(q, k, v, g, scale, None, None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not isinstance(state_pool, Tensor):
        raise TypeError(f"state_pool must be a Tensor, got {type(state_pool).__name__}")
    if state_pool.dtype != torch.float32:
        raise TypeError(f"state_pool must be float32, got {state_pool.dtype}")
    slot = (H, V, K) if state_v_first else (H, K, V)
    if state_pool.dim() != 4 or tuple(state_pool.shape[1:]) != slot:
        layout = "[P, H, V, K]" if state_v_first else "[P, H, K, V]"
        raise ValueError(f"state_pool must have shape {layout} = [P, {', '.join(map(str, slot))}], "
                         f"got {tuple(state_pool.shape)}")
    if not state_pool.is_contiguous():
        raise ValueError("state_pool must be contiguous (it is updated in place)")
    if not isinstance(state_index, Tensor):
        raise TypeError(f"state_index must be a Tensor, got {type(state_index).__name__}")
    if state_index.dtype not in (torch.int32, torch.int64) or tuple(state_index.shape) != (B,):
        raise ValueError(f"state_index must be an int32 or int64 tensor of shape [B] = [{B}], got "
                         f"{state_index.dtype} {tuple(state_index.shape)}")
    for name, x in (("state_pool", state_pool), ("state_index", state_index)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if check_index and not _is_tracing():
        index = state_index.tolist()
        P = state_pool.shape[0]
        bad = [i for i in index if not -1 <= i < P]
        if bad:
            raise ValueError(f"state_index values must be in [-1, P) = [-1, {P}), got {bad[0]}")
        used = [i for i in index if i >= 0]
        if len(set(used)) != len(used):
            raise ValueError("state_index uses a pool slot twice")
    return torch.ops.gla.recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index.contiguous(),
                                             bool(state_v_first), dispatch.requested_backend(backend))


def explain_backend(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Optional[Tensor] = None,
                    cu_seqlens: Optional[Tensor] = None, op: str = "chunk_fwd",
                    backend: Optional[str] = None) -> dispatch.Choice:
    """Which backend would run ``op`` (chunk_fwd, chunk_bwd, recurrent_fwd, recurrent_bwd,
    recurrent_pool_fwd_: pass the pool as initial_state) on these inputs, and why each other backend would not. ``print()`` it for a table."""
    return dispatch.choose(op, q, k, v, g, initial_state, cu_seqlens, backend)
