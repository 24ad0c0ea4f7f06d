"""Serving over a state pool: chunked prefill and speculative-decoding verify.

A server keeps every live sequence's recurrent state in one float32 pool per layer,
``state_pool`` [P, H, K, V] (or [P, H, V, K] with ``state_v_first=True``, the layout vLLM and
SGLang keep), and names slots with int32/int64 index tensors on the pool's device. The
decode step is ``fused_recurrent_gla_pooled`` (api.py); this module adds:

* ``chunk_gla_pooled``: prefill (or chunked prefill) of packed sequences, each starting from
  a slot and leaving its final state in a slot, optionally a different one (copy-on-write
  for prefix caching), with checkpoints (the state every ``checkpoint_every`` tokens) written
  to further slots.
* ``fused_recurrent_gla_verify_pooled``: speculative-decoding verify; T draft tokens per row,
  the state after every token stored to its own slot, so a rejected draft rolls back by
  picking a slot, without recomputation (vLLM's ``ssm_state_indices`` [N, T] with
  ``num_accepted_tokens``).

Index values (one meaning everywhere in this module):
  * a slot in [0, P) names a pool slot;
  * -1 (any value outside [0, P) when unchecked) is padding: nothing is read or written
    there; a sequence whose start index is padding is skipped entirely: zeros out, no slot
    read or written for it (no final state, no checkpoints);
  * every slot is read before any slot is written: a call may write the slot it reads
    (the usual in-place update), but a slot written by one sequence must not be read or
    written by another in the same call (checked with check_indices; racy otherwise).

Index checks (``check_indices``): shapes, dtypes and devices are always checked (no device
read). The values (ranges, a slot written twice, a slot written by one sequence and read
by another, cu_seqlens) are checked with one host read per index tensor, which synchronises
with the GPU, so it is off by default; ``check_indices=None`` means the variable
GLA_CHECK_INDICES=1 turns it on (for tests and debugging a server). It is skipped under
CUDA-graph capture and torch.compile. A rejected call writes nothing.

Backends (``explain_backend(..., op="chunk_pool_fwd_" or "recurrent_verify_pool_fwd_")``):
  * reference: PyTorch, CPU and GPU (reads the indices on the host);
  * cuda: the prefill, where the compiled chunked forward covers the inputs: its walks read
    each start slot and write the final state and checkpoints to their slots inside the
    kernel (no split into segments, so that a slot is read and written by the same threads);
  * triton: the verify is one recurrent Triton kernel with per-token state stores (no host
    read). The prefill is a gather / chunked forward / scatter composition around the
    chunked forward chunk_gla would run (the Triton one, with float32 chunk states, when
    checkpoints are asked for): correct and graph-capturable, one more trip through memory
    per state (tools/bench_serving.py measures both against chunk_gla with initial_state).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from gla_cuda import dispatch, ops  # noqa: F401  (ops defines torch.ops.gla)
from gla_cuda.api import _check_cu_seqlens_layout, _check_offsets, _check_pool, _is_tracing, _prepare
from gla_cuda.intermediates import C_CHUNK  # checkpoints fall on the chunked forward's chunk boundaries

_INDEX_DTYPES = (torch.int32, torch.int64)


def _checking(check_indices: Optional[bool]) -> bool:
    if check_indices is None:
        check_indices = os.environ.get("GLA_CHECK_INDICES", "0") == "1"
    return bool(check_indices) and not _is_tracing()


def _check_index(name, x, shape, device, dtypes=_INDEX_DTYPES, what="an int32 or int64"):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes or x.dim() != len(shape) or any(
            want is not None and have != want for have, want in zip(x.shape, shape)):
        dims = ", ".join("any" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must be {what} tensor of shape [{dims}], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    return x.contiguous()


def _in_range(name, values, P):
    bad = [i for i in values if not -1 <= i < P]
    if bad:
        raise ValueError(f"{name} values must be in [-1, P) = [-1, {P}), got {bad[0]}")


def _check_hazards(reads, writes):
    """reads: {sequence: slot}; writes: [(sequence, slot, what)]. One writer per slot, and
    no slot written by one sequence and read by another."""
    owner = {}
    for n, slot, what in writes:
        if slot in owner:
            raise ValueError(f"pool slot {slot} is written twice in one call ({owner[slot][1]} of "
                             f"sequence {owner[slot][0]} and {what} of sequence {n})")
        owner[slot] = (n, what)
    for n, slot in reads.items():
        if slot in owner and owner[slot][0] != n:
            raise ValueError(f"pool slot {slot} is read by sequence {n} and written by sequence "
                             f"{owner[slot][0]} ({owner[slot][1]}) in the same call")


def _check_cu_values(cu_seqlens, T):
    bounds = cu_seqlens.tolist()
    _check_offsets(bounds, T, "cu_seqlens")
    return bounds


def _check_out(out, v):
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a Tensor, got {type(out).__name__}")
    if out.shape != v.shape or out.dtype != v.dtype or out.device != v.device:
        raise ValueError(f"out must be a {v.dtype} tensor of v's shape {tuple(v.shape)} on {v.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def chunk_gla_pooled(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state_pool: Tensor,
                     state_indices: Tensor, cu_seqlens: Optional[Tensor] = None, *,
                     scale: Optional[float] = None, has_initial_state: Optional[Tensor] = None,
                     final_state_indices: Optional[Tensor] = None,
                     checkpoint_every: Optional[int] = None,
                     checkpoint_indices: Optional[Tensor] = None, out: Optional[Tensor] = None,
                     state_v_first: bool = False, check_indices: Optional[bool] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Prefill (or one chunk of a chunked prefill) whose states live in a pool.

    q, k, g: [1, T, H, K], v: [1, T, H, V] packed, with cu_seqlens int32/int64 [N + 1]
    (from 0, non-decreasing, to T); or [N, T, H, *] equal-length sequences without it.
    state_pool: float32 [P, H, K, V] ([P, H, V, K] with state_v_first), updated in place.

    state_indices [N]: sequence n starts from pool[state_indices[n]] and, unless
        final_state_indices is given, leaves its final state there. -1: padding (zeros out,
        nothing read or written for the sequence).
    has_initial_state bool [N] (vLLM's flag): False starts sequence n from zeros instead
        of reading its slot (a new request); its slot is still written.
    final_state_indices [N]: where the final state goes instead (read slot a, write slot b:
        copy-on-write for prefix caching); -1 there: the final state is not stored.
    checkpoint_every (a positive multiple of 64) with checkpoint_indices [N, M]: the state
        after the first (j + 1) * checkpoint_every tokens of sequence n in this call goes to
        slot checkpoint_indices[n, j], where the sequence is that long (-1: not stored).
        Positions count from the sequence's first token in this call: align a chunked
        prefill's chunks to checkpoint_every for checkpoints at absolute positions.
    out: preallocated output (v's shape and dtype, contiguous), written and returned.

    Returns o (out, if given). No autograd. Index values and checks: module docstring.
    """
    if cu_seqlens is None and isinstance(q, Tensor) and q.dim() == 4:
        # equal lengths: the same call on the packed view
        B, T = q.shape[:2]
        flat = [x.reshape(1, B * T, *x.shape[2:]) if isinstance(x, Tensor) and x.dim() == 4 else x
                for x in (q, k, v, g)]
        if out is not None:
            _check_out(out, v)
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int64) * T
        o = chunk_gla_pooled(*flat, state_pool, state_indices, cu, scale=scale,
                             has_initial_state=has_initial_state, final_state_indices=final_state_indices,
                             checkpoint_every=checkpoint_every, checkpoint_indices=checkpoint_indices,
                             out=None if out is None else out.view(1, B * T, *out.shape[2:]),
                             state_v_first=state_v_first, check_indices=check_indices, backend=backend)
        return o.view(v.shape)
    q, k, v, g, scale, _, _ = _prepare(q, k, v, g, scale, None, None)
    _, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    _check_cu_seqlens_layout(cu_seqlens, q.shape[0])
    cu_seqlens = _check_index("cu_seqlens", cu_seqlens, (None,), dev)  # its device; contiguous
    N = cu_seqlens.numel() - 1
    _check_pool(state_pool, H, K, V, state_v_first, dev)
    P = state_pool.shape[0]
    state_indices = _check_index("state_indices", state_indices, (N,), dev)
    if has_initial_state is not None:
        has_initial_state = _check_index("has_initial_state", has_initial_state, (N,), dev,
                                         (torch.bool,), "a bool")
    if final_state_indices is not None:
        final_state_indices = _check_index("final_state_indices", final_state_indices, (N,), dev)
    every = 0
    if checkpoint_indices is not None:
        checkpoint_indices = _check_index("checkpoint_indices", checkpoint_indices, (N, None), dev)
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or \
                checkpoint_every <= 0 or checkpoint_every % C_CHUNK:
            raise ValueError(f"checkpoint_every must be a positive multiple of {C_CHUNK} with "
                             f"checkpoint_indices, got {checkpoint_every!r}")
        every = checkpoint_every
    elif checkpoint_every is not None:
        raise ValueError("checkpoint_every needs checkpoint_indices (the slots to write)")
    if out is not None:
        _check_out(out, v)
    if _checking(check_indices):
        bounds = _check_cu_values(cu_seqlens, T)
        index = state_indices.tolist()
        _in_range("state_indices", index, P)
        final = final_state_indices.tolist() if final_state_indices is not None else index
        if final_state_indices is not None:
            _in_range("final_state_indices", final, P)
        marks = checkpoint_indices.tolist() if checkpoint_indices is not None else [[]] * N
        if checkpoint_indices is not None:
            _in_range("checkpoint_indices", [s for row in marks for s in row], P)
        has = has_initial_state.tolist() if has_initial_state is not None else [True] * N
        reads, writes = {}, []
        for n in range(N):
            if index[n] < 0:
                continue
            if has[n]:
                reads[n] = index[n]
            if final[n] >= 0:
                writes.append((n, final[n], "final state"))
            for j, slot in enumerate(marks[n]):
                if (j + 1) * every <= bounds[n + 1] - bounds[n] and slot >= 0:
                    writes.append((n, slot, f"checkpoint {j}"))
        _check_hazards(reads, writes)
    o = out if out is not None else torch.empty_like(v)
    torch.ops.gla.chunk_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                                  final_state_indices, cu_seqlens, every, checkpoint_indices,
                                  bool(state_v_first), o, dispatch.requested_backend(backend))
    return o


def fused_recurrent_gla_verify_pooled(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state_pool: Tensor,
                                      state_indices: Tensor, num_accepted_tokens: Optional[Tensor] = None,
                                      *, scale: Optional[float] = None,
                                      cu_seqlens: Optional[Tensor] = None, state_v_first: bool = False,
                                      check_indices: Optional[bool] = None,
                                      backend: Optional[str] = None) -> Tensor:
    """Speculative-decoding verify over a pool: every draft token of every row in one call.

    q, k, g: [N, T, H, K], v: [N, T, H, V] (or packed [1, total, H, *] with cu_seqlens [N + 1]:
    rows of different lengths). state_pool as in chunk_gla_pooled, updated in place.

    state_indices [N, S] (S >= every row's length): the state after token t of row n is
    stored to slot state_indices[n, t] (-1: not stored).
    num_accepted_tokens [N] (vLLM's convention): row n starts from slot
        state_indices[n, num_accepted_tokens[n] - 1], the state after the last token the
        previous step accepted; None: from state_indices[n, 0] (then T = 1 is a decode step).
    A row whose start slot is -1, or whose count is outside [1, S], is padding: zeros out,
    nothing read or written. Returns o [N, T, H, V]. No autograd. Index values and checks:
    module docstring.
    """
    q, k, v, g, scale, _, _ = _prepare(q, k, v, g, scale, None, None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    if cu_seqlens is not None:
        _check_cu_seqlens_layout(cu_seqlens, B)
        cu_seqlens = _check_index("cu_seqlens", cu_seqlens, (None,), dev)  # its device; contiguous
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    _check_pool(state_pool, H, K, V, state_v_first, dev)
    P = state_pool.shape[0]
    state_indices = _check_index("state_indices", state_indices, (N, None), dev)
    S = state_indices.shape[1]
    if cu_seqlens is None and S < T:
        raise ValueError(f"state_indices must have a slot per token: shape [N, S] with S >= T = {T}, "
                         f"got {tuple(state_indices.shape)}")
    if num_accepted_tokens is not None:
        num_accepted_tokens = _check_index("num_accepted_tokens", num_accepted_tokens, (N,), dev)
    if _checking(check_indices):
        if cu_seqlens is not None:
            bounds = _check_cu_values(cu_seqlens, T)
            lens = [b - a for a, b in zip(bounds, bounds[1:])]
            if max(lens, default=0) > S:
                raise ValueError(f"state_indices must have a slot per token: S = {S} is less than the "
                                 f"longest row ({max(lens)} tokens)")
        else:
            lens = [T] * N
        index = state_indices.tolist()
        _in_range("state_indices", [s for row in index for s in row], P)
        accepted = num_accepted_tokens.tolist() if num_accepted_tokens is not None else [1] * N
        bad = [a for a in accepted if not 1 <= a <= S]
        if bad:
            raise ValueError(f"num_accepted_tokens values must be in [1, S] = [1, {S}], got {bad[0]}")
        reads, writes = {}, []
        for n in range(N):
            start = index[n][accepted[n] - 1]
            if start < 0:
                continue
            reads[n] = start
            writes += [(n, s, f"token {t}") for t, s in enumerate(index[n][:lens[n]]) if s >= 0]
        _check_hazards(reads, writes)
    o = torch.empty_like(v)
    torch.ops.gla.recurrent_verify_pool_fwd_(q, k, v, g, scale, state_pool, state_indices,
                                             num_accepted_tokens, cu_seqlens, bool(state_v_first), o,
                                             dispatch.requested_backend(backend))
    return o
