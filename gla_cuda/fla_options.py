"""The keyword options of fla-core 0.6.0's ``chunk_gla`` and ``fused_recurrent_gla`` that the
kernels do not take themselves, so that switching from fla is a change of import:

* ``state_v_first`` (both): initial and final states in the V-first layout [N, H, V, K];
  the states are transposed around the call (one copy of each state).
* ``gk`` (fused_recurrent_gla): fla's name for the key gate ``g``; omitted with ``g``, the
  keys are not gated (g = 0).
* ``reverse`` (fused_recurrent_gla): the recurrence runs from each sequence's last token to
  its first; the tokens are reordered on the device around the usual call (any backend,
  with gradients).
* ``gv`` (fused_recurrent_gla): a forget gate on the value dimension, S_t = diag(exp(gk_t))
  S_{t-1} diag(exp(gv_t)) + k_t^T v_t. No kernel takes it: it runs on the PyTorch reference
  (op "recurrent_gv_fwd" in explain_backend), on the inputs' device, with gradients through
  autograd. Slow; meant for compatibility, not for speed.
* ``transpose_state_layout`` (fused_recurrent_gla): fla's deprecated name for ``state_v_first``,
  with fla's DeprecationWarning.
* ``cu_seqlens_cpu`` (chunk_gla): fla's host copy of cu_seqlens for building chunk indices;
  accepted and not needed (the chunk bookkeeping here is built on the device).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gla_cuda import dispatch
from gla_cuda.intermediates import token_sequence
from gla_cuda.ops import _num_states


def v_first_in(q, v, initial_state, cu_seqlens):
    """A V-first initial state [N, H, V, K] as the [N, H, K, V] view the kernels take."""
    if not isinstance(initial_state, Tensor) or not isinstance(q, Tensor) or not isinstance(v, Tensor):
        return initial_state  # the usual checks name the argument
    if q.dim() == 4 and v.dim() == 4 and (cu_seqlens is None or isinstance(cu_seqlens, Tensor)):
        want = (_num_states(q, cu_seqlens), q.shape[2], v.shape[-1], q.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape [N, H, V, K] = {want} with state_v_first=True, "
                             f"got {tuple(initial_state.shape)}")
    return initial_state.transpose(-1, -2)


def v_first_out(final_state):
    return None if final_state is None else final_state.transpose(-1, -2).contiguous()


def state_layout_alias(state_v_first, transpose_state_layout):
    """state_v_first given under fla's deprecated name (fla warns and takes it the same way)."""
    if state_v_first:
        raise ValueError("pass state_v_first or the deprecated transpose_state_layout, not both")
    warnings.warn("transpose_state_layout is deprecated: it is state_v_first under an older name",
                  DeprecationWarning, stacklevel=3)
    return transpose_state_layout


def _reverse_index(q, cu_seqlens):
    """Token order with every sequence reversed (an involution), built on the device."""
    T = q.shape[1]
    t = torch.arange(T, device=q.device)
    if cu_seqlens is None:
        return T - 1 - t
    cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    seq = token_sequence(cu, t)
    return cu[seq] + cu[seq + 1] - 1 - t


def _check_gv(gv, v):
    if not isinstance(gv, Tensor):
        raise TypeError(f"gv must be a Tensor, got {type(gv).__name__}")
    if gv.shape != v.shape:
        raise ValueError(f"gv must have v's shape {tuple(v.shape)}, got {tuple(gv.shape)}")
    if gv.dtype not in (torch.float32, v.dtype):
        raise TypeError(f"gv must be float32 or v's dtype {v.dtype}, got {gv.dtype}")
    if gv.device != v.device:
        raise ValueError(f"gv is on {gv.device} but q is on {v.device}")


def fused_recurrent_gla(call, prepare, q, k, v, g, gk, gv, scale, initial_state, output_final_state,
                        reverse, state_v_first, cu_seqlens, backend):
    """fused_recurrent_gla with fla's options. call(q, k, v, g, initial_state) runs the usual
    op and returns (o, final_state); prepare is api._prepare (the argument checks)."""
    if g is not None and gk is not None:
        raise TypeError("pass the key gate once: as g or as gk, not both")
    g = gk if gk is not None else g
    if g is None and isinstance(q, Tensor):
        g = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if state_v_first:
        initial_state = v_first_in(q, v, initial_state, cu_seqlens)
    if gv is not None:
        q, k, v, g, scale, initial_state, cu_seqlens = prepare(q, k, v, g, scale, initial_state, cu_seqlens)
        _check_gv(gv, v)
        o, ht = dispatch.run("recurrent_gv_fwd", q, k, v, g, initial_state, cu_seqlens, backend,
                             gv.contiguous(), scale, initial_state, bool(output_final_state), bool(reverse),
                             cu_seqlens)
        ht = ht if output_final_state else None
    elif reverse:
        if not isinstance(q, Tensor) or q.dim() != 4:
            prepare(q, k, v, g, scale, initial_state, cu_seqlens)  # raises, naming the argument
        order = _reverse_index(q, cu_seqlens)
        flip = lambda x: x.index_select(1, order) if isinstance(x, Tensor) and x.dim() == 4 else x
        o, ht = call(flip(q), flip(k), flip(v), flip(g), initial_state)
        o = o.index_select(1, order)
    else:
        o, ht = call(q, k, v, g, initial_state)
    return o, (v_first_out(ht) if state_v_first else ht)
