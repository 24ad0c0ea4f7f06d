"""The torch.ops.gla operators: every schema is defined here, once.

Public ops (CPU and CUDA implementations pick a backend through gla_cuda.dispatch):

    gla::chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state,
                   bool output_final_state, Tensor? cu_seqlens, str backend)
        -> (Tensor o, Tensor final_state)
    gla::chunk_bwd(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state,
                   Tensor? cu_seqlens, Tensor do, Tensor? dht, str backend)
        -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dh0)
    gla::chunk_fwd_train(<chunk_fwd's arguments>) -> (Tensor o, Tensor final_state, Tensor A,
                   Tensor flags, Tensor qx, Tensor kd, Tensor decays, Tensor states)
    gla::chunk_bwd_saved(<chunk_bwd's arguments>, Tensor A, Tensor flags, Tensor qx,
                   Tensor kd, Tensor decays, Tensor states) -> <chunk_bwd's outputs>
        training (chunk_gla with gradients): where the backward that runs (compiled or
        Triton) can take the forward's intermediates and the forward that runs can keep them
        (dispatch.saving_backend), the forward keeps them (the scores, the exact flags, the
        gated operands, the per-chunk decays and states; layout: gla_cuda/intermediates.py)
        instead of the backward recomputing them;
        elsewhere they are empty [0] tensors and chunk_fwd runs.
    gla::recurrent_fwd / gla::recurrent_bwd: the same schemas, for the recurrent form.
    gla::recurrent_pool_fwd_(Tensor q, Tensor k, Tensor v, Tensor g, float scale,
                             Tensor(a!) state_pool, Tensor state_index, bool state_v_first,
                             str backend) -> Tensor o
        serving: batch row b runs its tokens from, and writes its final state back to,
        state_pool[state_index[b]] (float32 [P, H, K, V], or [P, H, V, K] with
        state_v_first) in place; an index outside [0, P) (-1) skips the row (o = 0).
    gla::chunk_pool_fwd_(Tensor q, Tensor k, Tensor v, Tensor g, float scale,
                         Tensor(a!) state_pool, Tensor state_indices, Tensor? has_initial_state,
                         Tensor? final_state_indices, Tensor cu_seqlens, int checkpoint_every,
                         Tensor? checkpoint_indices, bool state_v_first, Tensor(b!) o,
                         str backend) -> ()
        serving prefill: packed sequences (B = 1) start from and end in pool slots, with
        state checkpoints every checkpoint_every tokens; o (preallocated) and the pool are
        written in place.
    gla::recurrent_verify_pool_fwd_(Tensor q, Tensor k, Tensor v, Tensor g, float scale,
                                    Tensor(a!) state_pool, Tensor state_indices,
                                    Tensor? num_accepted_tokens, Tensor? cu_seqlens,
                                    bool state_v_first, Tensor(b!) o, str backend) -> ()
        serving speculative-decoding verify: row n starts from slot
        state_indices[n, num_accepted_tokens[n] - 1] and stores the state after its token t
        to state_indices[n, t].
        Both: the meaning of every index value is documented once, in gla_cuda/serving.py.
    gla::rms_norm_gated / gla::rms_norm_gated_bwd: the GLA layer's fused swish-gated
        RMSNorm (its own section at the end of this file).

Private kernel ops, implemented by the compiled extension (gla_cuda._C) for CUDA: the
public schema without ``backend``, named ``gla::cuda_<op>`` (cuda_chunk_fwd,
cuda_recurrent_fwd, cuda_recurrent_bwd, cuda_recurrent_pool_fwd_, cuda_chunk_pool_fwd_); and
cuda_chunk_fwd_saving(<cuda_chunk_fwd's arguments>, Tensor chunk_off, int num_slots), the
training forward keeping chunk_fwd_train's intermediates (chunk_off: the layout's
first slot of every sequence, [N + 1] int64), and cuda_chunk_bwd_saved(<chunk_bwd's arguments
but backend>, Tensor chunk_off, Tensor chunk_seq, <the intermediates>), the backward taking
them (chunk_seq: every slot's sequence, [slots] int64).

Outputs that were not asked for (final_state without output_final_state, dh0 without
initial_state) are empty tensors of shape [0]. Autograd is registered on the forward
ops; the backward ops are not differentiable again. chunk_gla's eager training calls take
chunk_fwd_train below: the same op and backward through an autograd.Function (host time).
"""
from __future__ import annotations

import torch
from torch import Tensor

from gla_cuda import dispatch, intermediates
from gla_cuda.backends import compute_dtype

_FWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state, "
             "bool output_final_state, Tensor? cu_seqlens")
_BWD_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state, "
             "Tensor? cu_seqlens, Tensor do, Tensor? dht")
_POOL_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor(a!) state_pool, "
              "Tensor state_index, bool state_v_first")
_CHUNK_POOL_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor(a!) state_pool, "
                    "Tensor state_indices, Tensor? has_initial_state, Tensor? final_state_indices, "
                    "Tensor cu_seqlens, int checkpoint_every, Tensor? checkpoint_indices, "
                    "bool state_v_first, Tensor(b!) o")
_VERIFY_POOL_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor(a!) state_pool, "
                     "Tensor state_indices, Tensor? num_accepted_tokens, Tensor? cu_seqlens, "
                     "bool state_v_first, Tensor(b!) o")
_FWD_OUT = "(Tensor o, Tensor final_state)"
_BWD_OUT = "(Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dh0)"
# what a training forward keeps for its backward (chunk_fwd_train below; gla_cuda.intermediates)
_SAVED = ", ".join(f"Tensor {name}" for name in intermediates.NAMES)

SCHEMAS = {
    "chunk_fwd": f"({_FWD_ARGS}, str backend) -> {_FWD_OUT}",
    "chunk_bwd": f"({_BWD_ARGS}, str backend) -> {_BWD_OUT}",
    "chunk_fwd_train": f"({_FWD_ARGS}, str backend) -> (Tensor o, Tensor final_state, {_SAVED})",
    "chunk_bwd_saved": f"({_BWD_ARGS}, str backend, {_SAVED}) -> {_BWD_OUT}",
    "recurrent_fwd": f"({_FWD_ARGS}, str backend) -> {_FWD_OUT}",
    "recurrent_bwd": f"({_BWD_ARGS}, str backend) -> {_BWD_OUT}",
    "recurrent_pool_fwd_": f"({_POOL_ARGS}, str backend) -> Tensor",
    "chunk_pool_fwd_": f"({_CHUNK_POOL_ARGS}, str backend) -> ()",
    "recurrent_verify_pool_fwd_": f"({_VERIFY_POOL_ARGS}, str backend) -> ()",
    "cuda_chunk_fwd": f"({_FWD_ARGS}) -> {_FWD_OUT}",
    "cuda_chunk_fwd_saving": (f"({_FWD_ARGS}, Tensor chunk_off, int num_slots) "
                              f"-> (Tensor o, Tensor final_state, {_SAVED})"),
    "cuda_chunk_bwd_saved": f"({_BWD_ARGS}, Tensor chunk_off, Tensor chunk_seq, {_SAVED}) -> {_BWD_OUT}",
    "cuda_recurrent_fwd": f"({_FWD_ARGS}) -> {_FWD_OUT}",
    "cuda_recurrent_bwd": f"({_BWD_ARGS}) -> {_BWD_OUT}",
    "cuda_recurrent_pool_fwd_": f"({_POOL_ARGS}) -> Tensor",
    "cuda_chunk_pool_fwd_": f"({_CHUNK_POOL_ARGS}) -> ()",
    # the GLA layer's fused swish-gated RMSNorm (section at the end)
    "rms_norm_gated": "(Tensor x, Tensor? gate, Tensor? weight, float eps, str backend) -> Tensor",
    "rms_norm_gated_bwd": ("(Tensor dy, Tensor x, Tensor? gate, Tensor? weight, float eps, str backend) "
                           "-> (Tensor dx, Tensor dgate, Tensor dweight)"),
}

for _name, _schema in SCHEMAS.items():
    torch.library.define(f"gla::{_name}", _schema)


def _num_states(q: Tensor, cu_seqlens) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _state_dtype(q: Tensor) -> torch.dtype:
    return compute_dtype(q.dtype)


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


def _bwd_fake(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, backend=None):
    dh0 = torch.empty_like(initial_state) if initial_state is not None else _state_or_empty(None, q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dh0


def _pool_fake(q, k, v, g, scale, state_pool, state_index, state_v_first, backend=None):
    return torch.empty_like(v)


def _saved_like(kept, q, k, v, g, cu_seqlens):
    """chunk_fwd_train's intermediates as empty tensors: in their layout where they are
    kept, else the six [0] placeholders."""
    if not kept:
        return intermediates.placeholders(q)
    return intermediates.saved_like(q, k, v, g, cu_seqlens)


@torch.library.register_fake("gla::chunk_fwd_train")
def _fwd_train_fake(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    saver = dispatch.saving_backend(q, k, v, g, initial_state, cu_seqlens, backend)
    return _fwd_fake(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens) + \
        _saved_like(saver is not None, q, k, v, g, cu_seqlens)


@torch.library.register_fake("gla::cuda_chunk_fwd_saving")
def _cuda_fwd_saving_fake(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_off,
                          num_slots):
    return _fwd_fake(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens) + \
        _saved_like(True, q, k, v, g, cu_seqlens)


@torch.library.register_fake("gla::chunk_bwd_saved")
def _bwd_saved_fake(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, backend, *saved):
    return _bwd_fake(q, k, v, g, scale, initial_state, cu_seqlens, do, dht)


@torch.library.register_fake("gla::cuda_chunk_bwd_saved")
def _cuda_bwd_saved_fake(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, chunk_off, chunk_seq,
                         *saved):
    return _bwd_fake(q, k, v, g, scale, initial_state, cu_seqlens, do, dht)


for _name in ("chunk_fwd", "recurrent_fwd", "cuda_chunk_fwd", "cuda_recurrent_fwd"):
    torch.library.register_fake(f"gla::{_name}")(_fwd_fake)
for _name in ("chunk_bwd", "recurrent_bwd", "cuda_recurrent_bwd"):
    torch.library.register_fake(f"gla::{_name}")(_bwd_fake)
for _name in ("recurrent_pool_fwd_", "cuda_recurrent_pool_fwd_"):
    torch.library.register_fake(f"gla::{_name}")(_pool_fake)


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


@torch.library.impl("gla::chunk_fwd_train", ("cpu", "cuda"))
def _fwd_train_impl(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    saver = dispatch.saving_backend(q, k, v, g, initial_state, cu_seqlens, backend)
    if saver is None:
        o, ht = _fwd_impl("chunk_fwd")(q, k, v, g, scale, initial_state, output_final_state,
                                       cu_seqlens, backend)
        return (o, ht) + _saved_like(False, q, k, v, g, cu_seqlens)
    o, ht, saved = dispatch.backend_module(saver).chunk_fwd_saving(
        q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return (o, _state_or_empty(ht if output_final_state else None, q)) + tuple(saved)


@torch.library.impl("gla::chunk_bwd_saved", ("cpu", "cuda"))
def _bwd_saved_impl(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, backend, *saved):
    # the backend chunk_fwd_train kept them for (dispatch.saving_backend: the same choice)
    bwd = dispatch.choose("chunk_bwd", q, k, v, g, initial_state, cu_seqlens, backend, full=False).backend
    if bwd not in dispatch.SAVED_BACKWARDS:
        raise RuntimeError(f"gla_cuda: chunk_bwd_saved: the backward chosen ({bwd}) cannot take saved "
                           "intermediates")
    dq, dk, dv, dg, dh0 = dispatch.backend_module(bwd).chunk_bwd(
        q, k, v, g, scale, initial_state, cu_seqlens, do, dht, saved=saved)
    return dq, dk, dv, dg, _state_or_empty(dh0 if initial_state is not None else None, q)


@torch.library.impl("gla::recurrent_pool_fwd_", ("cpu", "cuda"))
def _pool_impl(q, k, v, g, scale, state_pool, state_index, state_v_first, backend):
    # the pool stands in for initial_state when a backend checks what it can run
    return dispatch.run("recurrent_pool_fwd_", q, k, v, g, state_pool, None, backend,
                        scale, state_pool, state_index, state_v_first)


@torch.library.register_fake("gla::chunk_pool_fwd_")
def _chunk_pool_fake(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                     final_state_indices, cu_seqlens, checkpoint_every, checkpoint_indices,
                     state_v_first, o, backend):
    return None  # writes its mutable arguments only


@torch.library.register_fake("gla::recurrent_verify_pool_fwd_")
def _verify_pool_fake(q, k, v, g, scale, state_pool, state_indices, num_accepted_tokens, cu_seqlens,
                      state_v_first, o, backend):
    return None


@torch.library.impl("gla::chunk_pool_fwd_", ("cpu", "cuda"))
def _chunk_pool_impl(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                     final_state_indices, cu_seqlens, checkpoint_every, checkpoint_indices,
                     state_v_first, o, backend):
    dispatch.run("chunk_pool_fwd_", q, k, v, g, state_pool, cu_seqlens, backend,
                 scale, state_pool, state_indices, has_initial_state, final_state_indices, cu_seqlens,
                 checkpoint_every, checkpoint_indices, state_v_first, o)


@torch.library.impl("gla::recurrent_verify_pool_fwd_", ("cpu", "cuda"))
def _verify_pool_impl(q, k, v, g, scale, state_pool, state_indices, num_accepted_tokens, cu_seqlens,
                      state_v_first, o, backend):
    dispatch.run("recurrent_verify_pool_fwd_", q, k, v, g, state_pool, cu_seqlens, backend,
                 scale, state_pool, state_indices, num_accepted_tokens, cu_seqlens, state_v_first, o)


for _op in ("chunk", "recurrent"):
    torch.library.impl(f"gla::{_op}_fwd", ("cpu", "cuda"))(_fwd_impl(f"{_op}_fwd"))
    torch.library.impl(f"gla::{_op}_bwd", ("cpu", "cuda"))(_bwd_impl(f"{_op}_bwd"))


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend = inputs
    # output[2:]: chunk_fwd_train's intermediates (none for the other forwards): no gradient
    # flows into them, and gradients nobody passed stay None instead of being materialised
    # as zeros (for the intermediates that was ~300 MB of memset per training step)
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens, *output[2:])
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.backend = scale, backend


def _backward(bwd_op):
    def backward(ctx, do, dht, *unused):
        q, k, v, g, initial_state, cu_seqlens, *saved = ctx.saved_tensors
        if dht is not None and dht.numel() == 0:
            dht = None  # the final state was not asked for
        do = torch.zeros_like(v) if do is None else do.contiguous()  # None: only the final state is used
        args = (q, k, v, g, ctx.scale, initial_state, cu_seqlens, do,
                None if dht is None else dht.contiguous())
        if intermediates.kept(saved):
            dq, dk, dv, dg, dh0 = torch.ops.gla.chunk_bwd_saved(*args, ctx.backend, *saved)
        else:
            dq, dk, dv, dg, dh0 = bwd_op(*args, ctx.backend)
        return dq, dk, dv, dg, None, dh0 if initial_state is not None else None, None, None, None
    return backward


for _fwd, _bwd in (("chunk_fwd", "chunk_bwd"), ("chunk_fwd_train", "chunk_bwd"),
                   ("recurrent_fwd", "recurrent_bwd")):
    torch.library.register_autograd(f"gla::{_fwd}", _backward(getattr(torch.ops.gla, _bwd)),
                                    setup_context=_setup_context)


class _ChunkTrain(torch.autograd.Function):
    """gla::chunk_fwd_train with the autograd registered above, for eager calls
    (chunk_fwd_train below): torch.library's autograd wrapper re-binds every call's arguments
    to the schema before setup_context (utils.fill_defaults, ~60 us of host time on the path
    from the forward's launches to the backward's), which the GPU waits for in a training step."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():  # the op's kernels, below its autograd
            output = torch.ops.gla.chunk_fwd_train.default(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward(torch.ops.gla.chunk_bwd))


def chunk_fwd_train(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    """gla::chunk_fwd_train with gradients: the op itself under torch.compile (traced like any
    op), the same kernels and backward through _ChunkTrain in eager mode."""
    args = (q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend)
    if torch.compiler.is_compiling():
        return torch.ops.gla.chunk_fwd_train(*args)
    return _ChunkTrain.apply(*args)


# ============================================================================
# Fused swish-gated RMSNorm (the GLA layer's output norm)
#
#   gla::rms_norm_gated(Tensor x, Tensor? gate, Tensor? weight, float eps, str backend) -> Tensor y
#   gla::rms_norm_gated_bwd(Tensor dy, Tensor x, Tensor? gate, Tensor? weight, float eps,
#                           str backend) -> (Tensor dx, Tensor dgate, Tensor dweight)
#
# y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate) over the last dim, float32 math, y in x's
# dtype, contiguous. dgate / dweight are empty [0] without a gate / weight. backend: "auto"
# (Triton for CUDA tensors it can run, else the PyTorch reference), "triton" or "reference";
# under "auto", GLA_BACKEND=triton|reference forces one too (GLA_BACKEND=cuda: there is no
# compiled norm kernel, so "auto"; gla_cuda.dispatch.norm_backend). The Triton kernels:
# gla_cuda/backends/triton/norm.py; the PyTorch math: gla_cuda/backends/reference.py.
# ============================================================================


def _norm_shapes(x, gate, weight, dy=None):
    D = x.shape[-1]
    if dy is not None and dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if weight is not None and tuple(weight.shape) != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")


@torch.library.register_fake("gla::rms_norm_gated")
def _rms_norm_gated_fake(x, gate, weight, eps, backend):
    _norm_shapes(x, gate, weight)
    return x.new_empty(x.shape)


@torch.library.register_fake("gla::rms_norm_gated_bwd")
def _rms_norm_gated_bwd_fake(dy, x, gate, weight, eps, backend):
    dgate = gate.new_empty(gate.shape) if gate is not None else x.new_empty(0)
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    return x.new_empty(x.shape), dgate, dweight


@torch.library.impl("gla::rms_norm_gated", ("cpu", "cuda"))
def _rms_norm_gated_impl(x, gate, weight, eps, backend):
    _norm_shapes(x, gate, weight)
    module = dispatch.backend_module(dispatch.norm_backend(x, gate, weight, backend))
    return module.rms_norm_gated_fwd(x, gate, weight, eps)


@torch.library.impl("gla::rms_norm_gated_bwd", ("cpu", "cuda"))
def _rms_norm_gated_bwd_impl(dy, x, gate, weight, eps, backend):
    _norm_shapes(x, gate, weight, dy)
    module = dispatch.backend_module(dispatch.norm_backend(x, gate, weight, backend))
    dx, dgate, dweight = module.rms_norm_gated_bwd(dy, x, gate, weight, eps)
    return (dx, x.new_empty(0) if dgate is None else dgate,  # two empties: outputs must not alias
            x.new_empty(0) if dweight is None else dweight)


def _norm_setup_context(ctx, inputs, output):
    x, gate, weight, eps, backend = inputs
    ctx.save_for_backward(x, gate, weight)
    ctx.eps, ctx.backend = eps, backend


def _norm_backward(ctx, dy):
    x, gate, weight = ctx.saved_tensors
    dx, dgate, dweight = torch.ops.gla.rms_norm_gated_bwd(dy, x, gate, weight, ctx.eps, ctx.backend)
    return dx, dgate if gate is not None else None, dweight if weight is not None else None, None, None


torch.library.register_autograd("gla::rms_norm_gated", _norm_backward, setup_context=_norm_setup_context)
