"""Context parallelism: chunk_gla over a sequence split across the ranks of a process group.

Each rank holds a contiguous slice of the packed sequence dimension (dim 1), in rank order.
The recurrence S_t = diag(exp g_t) S_{t-1} + k_t^T v_t is linear in the state entering a
slice, so a rank's outputs from its true initial state h are its outputs from a zero state
plus a term linear in h:

    o_t   = o_t(zero) + scale * (q_t * exp(G_t)) h        G_t = g_1 + ... + g_t (from the slice start)
    S_end = S_end(zero) + diag(exp(Gamma)) h            Gamma = G at the slice end

Every rank runs gla_cuda's chunked op on its slice once (from a zero state where the
sequence started earlier), one all-gather exchanges every rank's (S_end(zero), Gamma) of
the sequence its slice ends in, and each rank folds the earlier ranks' pieces into its h:
h <- diag(exp Gamma_j) h + S_j in rank order (the sequence's initial_state enters through the
piece of the rank where the sequence starts). Autograd runs through all of it; the all-gather's
backward is a reduce-scatter that brings each rank the gradient of its pieces' states from the
later ranks, which the local op's backward takes as the final-state gradient. So one training
step costs one local forward and one local backward, the small correction above, and one
all-gather forward plus one reduce-scatter backward of P x H x K x (V + 1) float32 per rank
(P = B without cu_seqlens, 1 with them); communication_bytes() counts it. docs/distributed.md
has the derivation, the costs and the overlap.

Replicated tensors follow torch.distributed's autograd collectives: initial_state and the
final states are the same on every rank, each rank's loss is its own, and the gradients are
those of the sum of the ranks' losses. The sharded inputs (q, k, v, g) get their whole
gradient on their rank; the gradient of initial_state is split over the ranks (each rank's
part is what its loss contributes; their sum is the gradient), which is what DDP/FSDP's
gradient reduction adds up when initial_state comes from parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from gla_cuda import api, ops
from gla_cuda.intermediates import token_sequence


def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gla_cuda.distributed needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


def _functional():
    # imported on first use: it registers the functional collective ops
    import torch.distributed._functional_collectives as fc
    return fc


def slice_offsets(local_len: int, device, group=None) -> Tensor:
    """int64 [W + 1] on ``device``: where every rank's slice starts in the packed sequence (the
    last entry is its total length), from one all-gather of the slices' lengths. Compute it
    once per batch and pass it to every chunk_gla call (``slice_offsets=``) to skip that
    all-gather in each layer."""
    return _gathered_offsets(local_len, device, _group(group))


def _gathered_offsets(local_len, device, group) -> Tensor:
    lengths = _functional().all_gather_single(
        torch.full((1,), local_len, dtype=torch.int64, device=device), 0, group)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def communication_bytes(world_size: int, heads: int, k: int, v: int, pieces: int = 1,
                        num_states: int = 0, offsets: bool = True, backward: bool = True) -> dict:
    """Bytes one rank sends and receives per chunk_gla call (one layer), by collective.

    pieces: P, the states each rank exchanges (B without cu_seqlens, 1 with them);
    num_states: N when a varlen call returns its final states (output_final_state), else 0;
    offsets: a varlen call without slice_offsets (one all-gather of the slices' lengths).
    Ring algorithms: an all-gather or reduce-scatter of W blocks of b bytes moves (W - 1) b in
    and out of each rank; an all-reduce of b bytes, 2 (W - 1) / W b. Returns {"all_gather",
    "reduce_scatter", "all_reduce", "offsets", "forward", "backward", "total"}: bytes received
    per rank (sent is the same), and "gathered": the all-gather's output buffer, W blocks."""
    W = world_size
    block = pieces * heads * k * (v + 1) * 4       # float32 S [P, H, K, V] and Gamma [P, H, K]
    state = num_states * heads * k * v * 4
    out = {"gathered": W * block, "all_gather": (W - 1) * block,
           "reduce_scatter": (W - 1) * block if backward else 0,
           "all_reduce": 2 * (W - 1) * state // W, "offsets": (W - 1) * 8 if offsets else 0}
    out["forward"] = out["all_gather"] + out["all_reduce"] + out["offsets"]
    out["backward"] = out["reduce_scatter"] + (out["all_reduce"] if backward else 0)
    out["total"] = out["forward"] + out["backward"]
    return out


def _joins_backward(x: Tensor, needs_grad: bool) -> Tensor:
    """x, requiring grad wherever the call does: a collective's backward is a collective that
    every rank must join, so its input must take part in autograd on every rank, also where
    this rank's part does not depend on a differentiable input (an empty slice, a rank
    that holds no sequence's start while only initial_state requires grad)."""
    return x.detach().requires_grad_() if needs_grad and not x.requires_grad else x


def _exchange(S: Tensor, gamma: Tensor, group, W: int, needs_grad: bool):
    """All-gathers every rank's [P, H, K, V] states and [P, H, K] decays in one collective
    (float32, or float64 for float64 inputs); differentiable (its backward reduce-scatters)."""
    P, H, K, V = S.shape
    flat = torch.cat([S.reshape(P, H * K * V), gamma.reshape(P, H * K)], 1).reshape(-1)
    flat = _joins_backward(flat, needs_grad)
    out = _functional().all_gather_single(flat, 0, group).reshape(W, P, H * K * (V + 1))
    return out[..., :H * K * V].reshape(W, P, H, K, V), out[..., H * K * V:].reshape(W, P, H, K)


def _fold(S: Tensor, gamma: Tensor, chain: Tensor) -> Tensor:
    """The state after the chained pieces, in rank order, from a zero state:
    sum_j chain_j exp(sum_{i > j} chain_i Gamma_i) S_j. S [W, P, H, K, V], gamma [W, P, H, K],
    chain [W] or [W, P] (1 for the pieces of the sequence, 0 elsewhere). The decay sums are
    reverse cumulative sums (no differences): every exponent is <= 0."""
    chain = chain.to(S.dtype).reshape(*chain.shape, *(1,) * (gamma.dim() - chain.dim()))
    masked = gamma * chain
    after = masked.flip(0).cumsum(0).flip(0)                 # sum over i >= j
    after = torch.cat([after[1:], torch.zeros_like(after[:1])])  # sum over i > j
    return (torch.exp(after)[..., None] * (S * chain[..., None])).sum(0)


def _inflow(q: Tensor, g: Tensor, h: Tensor, scale: float, tokens: Optional[Tensor]) -> Tensor:
    """scale * (q_t * exp(G_t)) h: what the state h entering the slice adds to o_t, for tokens
    of the first sequence of the slice (``tokens``: [T] mask; None: all). q, g [B, T, H, K],
    h [B, H, K, V]. The decays accumulate in the state dtype; the product runs in q's dtype
    for float16/bfloat16 (with float32 accumulation, as the kernels' inter-chunk product)."""
    acc = h.dtype
    decayed = q.to(acc) * torch.exp(g.to(acc).cumsum(1))
    if tokens is not None:
        decayed = decayed * tokens.to(acc)[None, :, None, None]
    mm = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else acc
    return torch.einsum("bthk,bhkv->bthv", decayed.to(mm), h.to(mm)) * scale


def _local(q, k, v, g, scale, initial_state, cu_seqlens, backend):
    """gla_cuda.chunk_gla on this rank's slice, keeping the final states. The arguments are
    checked by chunk_gla below; the local cu_seqlens are valid by construction, and checking
    them again would read them on the host (a synchronisation) in every call."""
    return api._launch(torch.ops.gla.chunk_fwd, q, k, v, g, scale, initial_state, True, cu_seqlens,
                       backend)


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              cu_seqlens: Optional[Tensor] = None, group=None, backend: Optional[str] = None,
              slice_offsets: Optional[Tensor] = None):
    """gla_cuda.chunk_gla with the sequence dimension split across the ranks of ``group``
    (a torch.distributed ProcessGroup; default: the world). Call it on every rank of the group.

    q, k, g: [B, T_r, H, K], v: [B, T_r, H, V]: this rank's contiguous slice of dim 1, in rank
    order; slices may differ in length and may be empty (T_r = 0).
    Without cu_seqlens every batch row is one sequence, split across the ranks.
    cu_seqlens (B = 1): the GLOBAL offsets of the packed sequences (into the concatenation of
    all slices), the same on every rank, int32/int64 on q's device or on the CPU (then they are
    checked on the host). Sequences may start, end or span slice boundaries.
    slice_offsets (with cu_seqlens): int64 [W + 1] on q's device, where each rank's slice starts
    (slice_offsets() computes it); None: one all-gather of the slices' lengths per call.
    initial_state: float32 [N, H, K, V] for the N sequences (B, or len(cu_seqlens) - 1), the
    same on every rank. Returns (o [B, T_r, H, V]: this rank's slice of the output, final
    states float32 [N, H, K, V] of all N sequences, the same on every rank, or None).
    Gradients: q, k, v, g get their whole gradient; initial_state's is split over the ranks
    (their sum is the gradient; module docstring). Communication: torch.distributed's
    functional collectives (NCCL on GPUs, gloo on the CPU), traceable by torch.compile.
    """
    group = _group(group)
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, g, scale, _, _ = api._prepare(q, k, v, g, scale, None, None)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in (q, k, v, g, initial_state))
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        if slice_offsets is not None:
            raise ValueError("slice_offsets is for packed sequences: pass it with cu_seqlens")
        h0 = None if initial_state is None else api._check_initial_state(initial_state, q, B, V)
        return _split_rows(q, k, v, g, scale, h0, output_final_state, group, W, rank, backend, needs_grad)
    cu, offsets = _check_varlen(cu_seqlens, slice_offsets, q, W, rank)
    N = cu.shape[0] - 1
    h0 = None if initial_state is None else api._check_initial_state(initial_state, q, N, V)
    if offsets is None:
        offsets = _gathered_offsets(T, q.device, group)
        if cu_seqlens.device.type == "cpu" and offsets.device.type == "cpu" and not api._is_tracing():
            # every rank holds the same cu_seqlens and offsets: all raise together, none waits
            total, end = int(offsets[-1]), int(cu_seqlens[-1])
            if end != total:
                raise ValueError(f"cu_seqlens must end at the total length {total} of the ranks' "
                                 f"slices, got {end}")
    return _split_packed(q, k, v, g, scale, h0, output_final_state, cu, offsets, group, W, rank, backend,
                         needs_grad)


def _check_varlen(cu_seqlens, offsets, q, W, rank):
    """Checks cu_seqlens and slice_offsets; returns them as int64 on q's device. Values are read
    only where they are on the CPU (no synchronisation) and not under tracing."""
    api._check_cu_seqlens_layout(cu_seqlens, q.shape[0])
    if cu_seqlens.device not in (q.device, torch.device("cpu")):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}: it must be on q's device ({q.device}) "
                         "or on the CPU")
    if offsets is not None:
        if not isinstance(offsets, Tensor):
            raise TypeError(f"slice_offsets must be a Tensor, got {type(offsets).__name__}")
        if offsets.dim() != 1 or offsets.shape[0] != W + 1 or offsets.dtype != torch.int64:
            raise ValueError(f"slice_offsets must be an int64 tensor of shape [W + 1] = [{W + 1}], got "
                             f"{offsets.dtype} {tuple(offsets.shape)}")
        if offsets.device not in (q.device, torch.device("cpu")):
            raise ValueError(f"slice_offsets is on {offsets.device}: it must be on q's device ({q.device}) "
                             "or on the CPU")
    if not api._is_tracing():
        host = []  # only what is already on the CPU is read
        if cu_seqlens.device.type == "cpu":
            bounds = cu_seqlens.tolist()
            api._check_offsets(bounds, None, "cu_seqlens")  # the end: checked against slice_offsets
            host.append(bounds[-1])
        if offsets is not None and offsets.device.type == "cpu":
            at = offsets.tolist()
            api._check_offsets(at, None, "slice_offsets")
            if at[rank + 1] - at[rank] != q.shape[1]:
                raise ValueError(f"slice_offsets gives rank {rank} a slice of {at[rank + 1] - at[rank]} "
                                 f"tokens, but its q has T={q.shape[1]}")
            if host and host[0] != at[-1]:
                raise ValueError(f"cu_seqlens must end at the total length {at[-1]}, got {host[0]}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int64, non_blocking=True)
    if offsets is not None:
        offsets = offsets.to(device=q.device, non_blocking=True)
    return cu, offsets


def _empty_output(q, k, v, g) -> Tensor:
    """o of an empty slice ([B, 0, H, V]), computed from the inputs so that they get (empty)
    gradients as on the other ranks: a parameter whose gradient stayed None on one rank only
    would leave that rank out of the data-parallel gradient reduction."""
    return v + (q + k + g.to(q.dtype)).sum(-1, keepdim=True)


def _tie(o: Tensor, *gathered: Tensor) -> Tensor:
    """o, made to depend (with weight 0) on a collective's output that it does not use on this
    rank (the all-gather on rank 0 or an empty slice; the final states' all-reduce): the
    collective's backward is a collective that every rank must join, and autograd runs it
    only where the output takes part in the loss. With o in every rank's loss, every rank
    runs every backward collective, whichever outputs each rank's loss uses."""
    return o + sum(x.sum() for x in gathered).to(o.dtype) * 0


def _split_rows(q, k, v, g, scale, h0, output_final_state, group, W, rank, backend, needs_grad):
    """Without cu_seqlens: batch row b is one sequence over all ranks (P = B pieces each).
    Rank 0 starts from initial_state, the others from zero; rank r's state is the fold of
    ranks 0..r-1; the final states, the fold of all."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = ops._state_dtype(q)
    start = h0 if rank == 0 else None
    if T > 0:
        o, S = _local(q, k, v, g, scale, start, None, backend)
    else:  # nothing to run: the state passes through
        o = _empty_output(q, k, v, g)
        S = start if start is not None else q.new_zeros(B, H, K, V, dtype=acc)
    S_all, gamma_all = _exchange(S, g.to(acc).sum(1), group, W, needs_grad)
    if rank > 0 and T > 0:
        h = _fold(S_all, gamma_all, torch.arange(W, device=q.device) < rank)
        o = o + _inflow(q, g, h, scale, None).to(o.dtype)
    else:
        o = _tie(o, S_all, gamma_all)
    final = _fold(S_all, gamma_all, torch.ones(W, device=q.device)) if output_final_state else None
    return o, final


def _split_packed(q, k, v, g, scale, h0, output_final_state, cu, offsets, group, W, rank, backend,
                  needs_grad):
    """With global cu_seqlens: every rank exchanges the one piece its slice ends in (P = 1);
    rank r folds the earlier pieces of the sequence its slice starts in. Everything is
    computed on the device from cu and the offsets (no host reads)."""
    _, T, H, K = q.shape
    V = v.shape[-1]
    N = cu.shape[0] - 1
    acc = ops._state_dtype(q)
    device = q.device
    # [1]-shaped values, indexed by index_select: indexing with a 0-d tensor would read it
    # on the host (under torch.compile, a data-dependent value)
    start, end = offsets[rank:rank + 1], offsets[rank + 1:rank + 2]
    ends = offsets[1:]
    nonempty_rank = ends > offsets[:-1]
    last_of = torch.where(nonempty_rank, token_sequence(cu, ends - 1), -1)  # [W]: each rank's last piece
    first = token_sequence(cu, start)                                       # this rank's first piece

    if T > 0:
        begins_here = (cu[:-1] >= start) & (cu[:-1] < end)   # sequences whose first token is here
        init = None if h0 is None else h0 * begins_here.to(acc)[:, None, None, None]
        local_cu = (cu - start).clamp(0, T)
        o, S = _local(q, k, v, g, scale, init, local_cu, backend)
        tok = torch.arange(T, device=device)
        gl = g[0].to(acc)
        last = last_of[rank:rank + 1].clamp(min=0)
        in_last = tok >= (cu.index_select(0, last) - start).clamp(min=0)
        S_last = S.index_select(0, last)
        gamma_last = (gl * in_last.to(acc)[:, None, None]).sum(0, keepdim=True)
    else:
        o = _empty_output(q, k, v, g)
        S_last, gamma_last = q.new_zeros(1, H, K, V, dtype=acc), q.new_zeros(1, H, K, dtype=acc)
    S_all, gamma_all = _exchange(S_last, gamma_last, group, W, needs_grad)
    if T == 0:
        o, final = _tie(o, S_all, gamma_all), None
        if output_final_state:  # owns no sequence: contributes zeros to the all-reduce
            final = _finals(q.new_zeros(N, H, K, V, dtype=acc), cu, h0, group, needs_grad)
            o = _tie(o, final)
        return o, final
    chain = (torch.arange(W, device=device) < rank) & (last_of == first)
    h = _fold(S_all, gamma_all, chain)                                     # [1, H, K, V]
    in_first = tok < (cu.index_select(0, first + 1) - start)
    o = o + _inflow(q, g, h, scale, in_first).to(o.dtype)
    final = None
    if output_final_state:
        gamma_first = (gl * in_first.to(acc)[:, None, None]).sum(0)
        S = torch.index_add(S, 0, first, (torch.exp(gamma_first)[..., None] * h[0])[None])
        last_token = cu[1:] - 1
        owned = (cu[1:] > cu[:-1]) & (last_token >= start) & (last_token < end)
        final = _finals(S * owned.to(acc)[:, None, None, None], cu, h0, group, needs_grad)
        o = _tie(o, final)
    return o, final


def _finals(owned_states: Tensor, cu: Tensor, h0: Optional[Tensor], group, needs_grad: bool) -> Tensor:
    """Every sequence's final state on every rank: the rank holding its last token has it
    (the others pass zeros), one all-reduce adds them up; a sequence of length 0 keeps its
    initial state. Differentiable: the all-reduce's backward is an all-reduce."""
    final = _functional().all_reduce(_joins_backward(owned_states, needs_grad), "sum", group)
    if h0 is not None:
        final = final + h0 * (cu[1:] == cu[:-1]).to(h0.dtype)[:, None, None, None]
    return final
