"""The torch.ops.gla operators: every schema is defined here, once.

Public ops (CPU and CUDA implementations pick a backend through gla_cuda.dispatch):

    gla::chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state,
                   bool output_final_state, Tensor? cu_seqlens, str backend)
        -> (Tensor o, Tensor final_state)
    gla::chunk_bwd(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state,
                   Tensor? cu_seqlens, Tensor do, Tensor? dht, str backend)
        -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dh0)
    gla::recurrent_fwd / gla::recurrent_bwd: the same schemas, for the recurrent form.

Private kernel op, implemented by the compiled extension (gla_cuda._C) for CUDA:

    gla::cuda_chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor g, float scale,
                        Tensor? initial_state, bool output_final_state, Tensor? cu_seqlens)
        -> (Tensor o, Tensor final_state)

Outputs that were not asked for (final_state without output_final_state, dh0 without
initial_state) are empty tensors of shape [0]. Autograd is registered on the forward
ops; the backward ops are not differentiable again.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gla_cuda import dispatch

_FWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state, "
             "bool output_final_state, Tensor? cu_seqlens")
_BWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state, "
             "Tensor? cu_seqlens, Tensor do, Tensor? dht")
_FWD_OUT = "(Tensor o, Tensor final_state)"
_BWD_OUT = "(Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dh0)"

SCHEMAS = {
    "chunk_fwd": f"({_FWD_ARGS}, str backend) -> {_FWD_OUT}",
    "chunk_bwd": f"({_BWD_ARGS}, str backend) -> {_BWD_OUT}",
    "recurrent_fwd": f"({_FWD_ARGS}, str backend) -> {_FWD_OUT}",
    "recurrent_bwd": f"({_BWD_ARGS}, str backend) -> {_BWD_OUT}",
    "cuda_chunk_fwd": f"({_FWD_ARGS}) -> {_FWD_OUT}",
}

for _name, _schema in SCHEMAS.items():
    torch.library.define(f"gla::{_name}", _schema)


def _num_states(q: Tensor, cu_seqlens) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _state_dtype(q: Tensor) -> torch.dtype:
    """States are float32; float64 inputs (reference only, for gradcheck) keep float64."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _state_or_empty(x, like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0, dtype=_state_dtype(like))


# ----------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only
# ----------------------------------------------------------------------------

def _fwd_fake(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend=None):
    B, T, H, K = q.shape
    o = v.new_empty(B, T, H, v.shape[-1])
    ht = q.new_empty(_num_states(q, cu_seqlens), H, K, v.shape[-1], dtype=_state_dtype(q))
    return o, ht if output_final_state else _state_or_empty(None, q)


def _bwd_fake(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, backend):
    dh0 = torch.empty_like(initial_state) if initial_state is not None else _state_or_empty(None, q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dh0


for _name in ("chunk_fwd", "recurrent_fwd", "cuda_chunk_fwd"):
    torch.library.register_fake(f"gla::{_name}")(_fwd_fake)
for _name in ("chunk_bwd", "recurrent_bwd"):
    torch.library.register_fake(f"gla::{_name}")(_bwd_fake)


# ----------------------------------------------------------------------------
# Implementations: one per op, for CPU and CUDA, choosing the backend
# ----------------------------------------------------------------------------

def _fwd_impl(op):
    def impl(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
        o, ht = dispatch.run(op, q, k, v, g, initial_state, cu_seqlens, backend,
                             scale, initial_state, output_final_state, cu_seqlens)
        return o, _state_or_empty(ht if output_final_state else None, q)
    return impl


def _bwd_impl(op):
    def impl(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, backend):
        dq, dk, dv, dg, dh0 = dispatch.run(op, q, k, v, g, initial_state, cu_seqlens, backend,
                                           scale, initial_state, cu_seqlens, do, dht)
        return dq, dk, dv, dg, _state_or_empty(dh0 if initial_state is not None else None, q)
    return impl


for _op in ("chunk", "recurrent"):
    torch.library.impl(f"gla::{_op}_fwd", ("cpu", "cuda"))(_fwd_impl(f"{_op}_fwd"))
    torch.library.impl(f"gla::{_op}_bwd", ("cpu", "cuda"))(_bwd_impl(f"{_op}_bwd"))


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend = inputs
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
    ctx.scale, ctx.backend = scale, backend


def _backward(bwd_op):
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
        if dht is not None and dht.numel() == 0:
            dht = None  # the final state was not asked for
        dq, dk, dv, dg, dh0 = bwd_op(q, k, v, g, ctx.scale, initial_state, cu_seqlens,
                                     do.contiguous(), None if dht is None else dht.contiguous(),
                                     ctx.backend)
        return dq, dk, dv, dg, None, dh0 if initial_state is not None else None, None, None, None
    return backward


torch.library.register_autograd("gla::chunk_fwd", _backward(torch.ops.gla.chunk_bwd),
                                setup_context=_setup_context)
torch.library.register_autograd("gla::recurrent_fwd", _backward(torch.ops.gla.recurrent_bwd),
                                setup_context=_setup_context)
