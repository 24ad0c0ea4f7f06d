"""The public functions: validate the arguments, then call torch.ops.gla.

Layout and semantics follow flash-linear-attention (docs/design.md, 'Semantics'), so these are
drop-in replacements for ``fla.ops.gla.chunk_gla`` and ``fused_recurrent_gla``.
"""
from __future__ import annotations

import math
import os
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from gla_cuda import dispatch, fla_options, ops  # noqa: F401  (ops defines torch.ops.gla)
from gla_cuda.backends import OPS

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_tracing() -> bool:
    """True while values cannot (or must not) be read on the host."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# GLA_CHECK_CU_SEQLENS=1 reads the offsets of GPU tensors on the host too (a synchronisation
# per call): for debugging a caller whose offsets may be wrong.
_CHECK_ENV = "GLA_CHECK_CU_SEQLENS"


def _check_flag(name: str, x, none_is_false: bool = False) -> bool:
    if x is None and none_is_false:
        return False
    if not isinstance(x, (bool, int)):  # a Tensor here would be read on the host
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def _check_offsets(bounds: list, T: Optional[int], name: str) -> None:
    """The rule of every offsets list (cu_seqlens and the like): starts at 0, never
    decreases and, T given, ends at T."""
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b < a:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{i}] = {a} > "
                             f"{name}[{i + 1}] = {b}")
    if T is not None and bounds[-1] != T:
        raise ValueError(f"{name} must end at the packed length T={T}, got {bounds[-1]}")


def _check_cu_seqlens_layout(cu_seqlens, B: int) -> None:
    """cu_seqlens' type, dtype and shape, and the batch size 1 of packed inputs (its device
    and values are checked by each caller, as its contract says)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32 or int64 tensor, got "
                         f"{cu_seqlens.dim()}-D {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if B != 1:
        raise ValueError(f"with cu_seqlens, q must have batch size 1 (packed sequences), got B={B}")


def _check_cu_seqlens(cu_seqlens: Tensor, B: int, T: int, cu_seqlens_cpu=None) -> None:
    """Types and shapes always; the values where reading them costs no synchronisation (CPU
    tensors, or the caller's host copy cu_seqlens_cpu). The device: the caller's."""
    _check_cu_seqlens_layout(cu_seqlens, B)
    if cu_seqlens_cpu is not None:
        if not isinstance(cu_seqlens_cpu, Tensor):
            raise TypeError(f"cu_seqlens_cpu must be a Tensor, got {type(cu_seqlens_cpu).__name__}")
        if cu_seqlens_cpu.device.type != "cpu":
            raise ValueError(f"cu_seqlens_cpu must be on the CPU (the host copy of cu_seqlens), "
                             f"got {cu_seqlens_cpu.device}")
        if cu_seqlens_cpu.dim() != 1 or cu_seqlens_cpu.dtype not in (torch.int32, torch.int64) \
                or cu_seqlens_cpu.shape != cu_seqlens.shape:
            raise ValueError(f"cu_seqlens_cpu must be a 1-D int32 or int64 tensor of cu_seqlens' shape "
                             f"{tuple(cu_seqlens.shape)}, got {cu_seqlens_cpu.dim()}-D "
                             f"{cu_seqlens_cpu.dtype} {tuple(cu_seqlens_cpu.shape)}")
        _check_offsets(cu_seqlens_cpu.tolist(), T, "cu_seqlens_cpu")
        return
    if _is_tracing():
        return  # reading the values would synchronise: the caller vouches for them here
    if cu_seqlens.device.type != "cpu" and os.environ.get(_CHECK_ENV, "0") != "1":
        return  # a host read of GPU offsets would stall the stream: the caller vouches for them
    _check_offsets(cu_seqlens.tolist(), T, "cu_seqlens")


def _check_qkvg(q, k, v, g) -> None:
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
    K = q.shape[-1]
    if type(K) is int and K == 0:
        raise ValueError("q, k and g must have a head dim K >= 1 (their last dim), got K = 0: "
                         "the attention scores q k^T and the default scale K^-0.5 need one")
    for name, x in (("k", k), ("v", v), ("g", g)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def _check_state(name, state, q, shape) -> None:
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    state_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if state.dtype not in state_dtypes:
        raise TypeError(f"{name} must be float32, got {state.dtype}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [N, H, K, V] = {tuple(shape)}, got {tuple(state.shape)}")
    if state.device != q.device:
        raise ValueError(f"{name} is on {state.device} but q is on {q.device}")


def _check_initial_state(initial_state, q: Tensor, N: int, V: int) -> Tensor:
    """initial_state: float32 [N, H, K, V] (float64 too for float64 inputs); returned contiguous."""
    _check_state("initial_state", initial_state, q, (N, q.shape[2], q.shape[3], V))
    return initial_state.contiguous()


def _prepare(q, k, v, g, scale, initial_state, cu_seqlens, cu_seqlens_cpu=None):
    """Checks every argument (naming it in the error) and returns contiguous tensors."""
    _check_qkvg(q, k, v, g)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None and cu_seqlens_cpu is not None:
        raise ValueError("cu_seqlens_cpu is the host copy of cu_seqlens: pass cu_seqlens too")
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, Tensor) and cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        _check_cu_seqlens(cu_seqlens, B, T, cu_seqlens_cpu)
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


def _call(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend,
          cu_seqlens_cpu=None):
    q, k, v, g, scale, initial_state, cu_seqlens = _prepare(q, k, v, g, scale, initial_state, cu_seqlens,
                                                            cu_seqlens_cpu)
    output_final_state = _check_flag("output_final_state", output_final_state, none_is_false=True)
    return _launch(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend)


def _launch(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    """Runs ``op`` on arguments _prepare has checked (or that are valid by construction)."""
    backend = dispatch.requested_backend(backend)
    if op is torch.ops.gla.chunk_fwd and torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, g, initial_state)):
        op = ops.chunk_fwd_train  # may keep intermediates for the backward
    o, final_state = op(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend)[:2]
    return o, (final_state if output_final_state else None)


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              cu_seqlens: Optional[Tensor] = None, backend: Optional[str] = None, *,
              state_v_first: bool = False, cu_seqlens_cpu: Optional[Tensor] = None):
    """Gated linear attention in the chunkwise-parallel form.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; g is the log-space forget gate (g <= 0; -inf
    is a hard reset: the state is forgotten). Returns (o [B, T, H, V] in v's dtype, final
    state float32 [N, H, K, V] or None).
    cu_seqlens: packed sequences (B = 1), int32/int64 offsets [N + 1] on q's device.
    Offsets on the CPU are checked (start at 0, non-decreasing, end at T); offsets on the
    GPU are not read by default (that would stall the host for the GPU): pass their host
    copy as cu_seqlens_cpu to have it checked, else wrong offsets are the caller's
    responsibility (GLA_CHECK_CU_SEQLENS=1 reads them anyway, for debugging).
    backend: "cuda", "triton", "reference" or None/"auto" (default: $GLA_BACKEND or auto).
    state_v_first: states as [N, H, V, K], as in fla-core's chunk_gla (gla_cuda/fla_options.py).
    Sizes of 0 (B, T, H, V, or N = 0 sequences) give empty or zero results without a kernel.
    """
    if state_v_first:
        initial_state = fla_options.v_first_in(q, v, initial_state, cu_seqlens)
    o, ht = _call(torch.ops.gla.chunk_fwd, q, k, v, g, scale, initial_state, output_final_state,
                  cu_seqlens, backend, cu_seqlens_cpu)
    return o, (fla_options.v_first_out(ht) if state_v_first else ht)


def fused_recurrent_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                        scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                        backend: Optional[str] = None, *, gk: Optional[Tensor] = None,
                        gv: Optional[Tensor] = None, reverse: bool = False, state_v_first: bool = False,
                        cu_seqlens_cpu: Optional[Tensor] = None, transpose_state_layout: Optional[bool] = None):
    """Gated linear attention as a step-by-step recurrence (decoding, short inputs).

    Same arguments and results as chunk_gla; gk (fla's name for g), gv, reverse and
    state_v_first as in fla-core's fused_recurrent_gla (gla_cuda/fla_options.py), and
    transpose_state_layout, fla's deprecated name for state_v_first.
    """
    if transpose_state_layout is not None:
        state_v_first = fla_options.state_layout_alias(state_v_first, transpose_state_layout)
    if g is None or gk is not None or gv is not None or reverse or state_v_first:
        def call(q, k, v, g, initial_state):
            return _call(torch.ops.gla.recurrent_fwd, q, k, v, g, scale, initial_state, output_final_state,
                         cu_seqlens, backend, cu_seqlens_cpu)
        return fla_options.fused_recurrent_gla(call, _prepare, q, k, v, g, gk, gv, scale, initial_state,
                                               output_final_state, reverse, state_v_first, cu_seqlens,
                                               backend)
    return _call(torch.ops.gla.recurrent_fwd, q, k, v, g, scale, initial_state, output_final_state,
                 cu_seqlens, backend, cu_seqlens_cpu)


def _check_pool(state_pool, H, K, V, state_v_first, device):
    """A state pool of every pooled function: float32 [P, H, K, V] ([P, H, V, K] with
    state_v_first), contiguous, on q's device, outside autograd (it is updated in place)."""
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
    if state_pool.requires_grad:
        raise ValueError("state_pool must not require grad (it is updated in place, outside autograd)")
    if state_pool.device != device:
        raise ValueError(f"state_pool is on {state_pool.device} but q is on {device}")


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
    state_v_first = _check_flag("state_v_first", state_v_first)
    check_index = _check_flag("check_index", check_index)
    backend = dispatch.requested_backend(backend)
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_pool(state_pool, H, K, V, state_v_first, q.device)
    if not isinstance(state_index, Tensor):
        raise TypeError(f"state_index must be a Tensor, got {type(state_index).__name__}")
    if state_index.dtype not in (torch.int32, torch.int64) or tuple(state_index.shape) != (B,):
        raise ValueError(f"state_index must be an int32 or int64 tensor of shape [B] = [{B}], got "
                         f"{state_index.dtype} {tuple(state_index.shape)}")
    if state_index.device != q.device:
        raise ValueError(f"state_index is on {state_index.device} but q is on {q.device}")
    if not _is_tracing() and _overlaps(state_pool, (q, k, v, g, state_index)):
        raise ValueError("state_pool must not share memory with q, k, v, g or state_index "
                         "(it is written while they are read)")
    if check_index and not _is_tracing():
        index = state_index.tolist()
        P = state_pool.shape[0]
        bad = [(b, i) for b, i in enumerate(index) if not -1 <= i < P]
        if bad:
            raise ValueError(f"state_index values must be in [-1, P) = [-1, {P}), got {bad[0][1]} "
                             f"(state_index[{bad[0][0]}])")
        seen = {}
        for b, i in enumerate(index):
            if i >= 0 and i in seen:
                raise ValueError(f"state_index uses a pool slot twice: slot {i} (rows {seen[i]} and {b})")
            seen.setdefault(i, b)
    return torch.ops.gla.recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index.contiguous(),
                                             state_v_first, backend)


def _overlaps(x: Tensor, others) -> bool:
    """Whether x's storage bytes meet any of others' (same storage, intersecting ranges)."""
    if x.device.type == "meta" or x.numel() == 0:
        return False
    lo = x.data_ptr()
    hi = lo + x.numel() * x.element_size()
    for y in others:
        if y.numel() == 0 or y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            continue
        ylo = y.data_ptr()
        span = sum((s - 1) * st for s, st in zip(y.shape, y.stride())) + 1
        if ylo < hi and lo < ylo + span * y.element_size():
            return True
    return False


def explain_backend(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Optional[Tensor] = None,
                    cu_seqlens: Optional[Tensor] = None, op: str = "chunk_fwd",
                    backend: Optional[str] = None) -> dispatch.Choice:
    """Which backend would run ``op`` (chunk_fwd, chunk_bwd, recurrent_fwd, recurrent_bwd,
    recurrent_gv_fwd, and the pool ops recurrent_pool_fwd_, chunk_pool_fwd_,
    recurrent_verify_pool_fwd_: pass the pool as initial_state) on these inputs, and why each
    other backend would not; empty inputs (a size of 0) run no backend, and the report says so.
    The arguments are checked as the op would check them. ``print()`` it for a table."""
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if op.endswith("pool_fwd_"):
        if op == "recurrent_pool_fwd_" and cu_seqlens is not None:
            raise ValueError("cu_seqlens must be None for recurrent_pool_fwd_ (pooled rows are not packed)")
        q, k, v, g, _, _, cu_seqlens = _prepare(q, k, v, g, None, None, cu_seqlens)
        if not isinstance(initial_state, Tensor) or initial_state.dim() != 4:
            raise ValueError(f"for {op}, pass the state pool [P, H, K, V] as initial_state")
    else:
        # the tensors the op would run on (contiguous copies: their alignment may differ)
        q, k, v, g, _, initial_state, cu_seqlens = _prepare(q, k, v, g, None, initial_state, cu_seqlens)
    return dispatch.choose(op, q, k, v, g, initial_state, cu_seqlens, dispatch.requested_backend(backend))
