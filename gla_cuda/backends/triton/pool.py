"""Serving ops over a state pool (semantics: gla_cuda/serving.py).

* recurrent_verify_pool_fwd_: the speculative-decoding verify as one recurrent kernel. A
  program owns a [BK, BV] tile of one (row, head) state in float32 registers: it loads the
  tile from the row's start slot, walks the row's tokens and stores the tile after every
  token to that token's slot (the per-token stores are what make a rejected draft a
  rollback: the state after the last accepted token is already in a slot).
* chunk_pool_fwd_: the prefill as a gather / chunked forward / scatter composition. The
  start states are gathered into a dense [N, H, K, V] tensor (torch.index_select), the
  chunked forward runs on it (the backend chunk_gla picks on the GPU; the Triton chunked
  forward with float32 per-chunk states when checkpoints are asked for), and a small Triton
  kernel scatters the final states and checkpoints to their slots, skipping -1. This is a
  baseline, not the fast path: the gather, the dense copies and the scatter each move every
  state through memory once more than a chunked kernel reading and writing the slots itself.

Nothing here reads a device tensor on the host, so both ops can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gla_cuda.intermediates import C_CHUNK, ChunkSlots, token_sequence

from .recurrent import _bounds, _device, _warps


@triton.jit
def _state_offsets(o_k, o_v, K: tl.constexpr, V: tl.constexpr, V_FIRST: tl.constexpr):
    """Offsets of a [BK, BV] tile inside one head's state, in the pool's layout."""
    if V_FIRST:
        return o_v[None, :] * K + o_k[:, None]
    else:
        return o_k[:, None] * V + o_v[None, :]


@triton.jit(do_not_specialize=["T", "P"])
def _verify_kernel(q, k, v, g, o, pool, index, accepted, cu_seqlens, scale, T, P,
                   SLOTS: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                   V_FIRST: tl.constexpr, HAS_ACCEPTED: tl.constexpr, VARLEN: tl.constexpr):
    pid = tl.program_id(0)
    i_v, i_nh = pid % NV, pid // NV
    i_n, i_h = i_nh // H, i_nh % H
    bos, L = _bounds(cu_seqlens, i_n, T, VARLEN)

    # the start slot: the state after the last accepted token of the previous step
    a = tl.full([], 1, tl.int32)
    if HAS_ACCEPTED:
        a = tl.load(accepted + i_n).to(tl.int32)
    run = (a >= 1) & (a <= SLOTS)
    row = index + i_n.to(tl.int64) * SLOTS
    start = tl.load(row + tl.minimum(tl.maximum(a - 1, 0), SLOTS - 1)).to(tl.int64)
    run = run & (start >= 0) & (start < P)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_h.to(tl.int64) * K * V + _state_offsets(o_k, o_v, K, V, V_FIRST)
    S = tl.load(pool + tl.maximum(start, 0) * H * K * V + p_s, mask=m_kv & run, other=0.)

    p_x = (bos * H + i_h) * K + o_k
    p_y = (bos * H + i_h) * V + o_v
    for t in range(0, L):
        b_q = tl.load(q + p_x, mask=m_k, other=0.).to(tl.float32) * scale
        b_k = tl.load(k + p_x, mask=m_k, other=0.).to(tl.float32)
        b_g = tl.load(g + p_x, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + p_y, mask=m_v, other=0.).to(tl.float32)
        S = S * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        b_o = tl.where(run, tl.sum(S * b_q[:, None], 0), 0.)
        tl.store(o + p_y, b_o.to(o.dtype.element_ty), mask=m_v)
        dst = tl.load(row + t, mask=t < SLOTS, other=-1).to(tl.int64)
        keep = run & (dst >= 0) & (dst < P)
        tl.store(pool + tl.maximum(dst, 0) * H * K * V + p_s, S, mask=m_kv & keep)
        p_x += H * K
        p_y += H * V


@triton.jit
def _scatter_kernel(src, rows, pool, slots, P, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
                    V_FIRST: tl.constexpr):
    """pool[slots[r]] = src[rows[r]] (src [R, H, K, V]); skipped where either index is < 0
    or the slot is >= P."""
    pid = tl.program_id(0)
    i_v = pid % NV
    i_k = (pid // NV) % NK
    i_h = (pid // (NV * NK)) % H
    r = pid // (NV * NK * H)
    srow = tl.load(rows + r).to(tl.int64)
    slot = tl.load(slots + r).to(tl.int64)
    ok = (srow >= 0) & (slot >= 0) & (slot < P)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m = (o_k[:, None] < K) & (o_v[None, :] < V) & ok
    head = i_h.to(tl.int64) * K * V
    x = tl.load(src + tl.maximum(srow, 0) * H * K * V + head + o_k[:, None] * V + o_v[None, :], mask=m)
    tl.store(pool + tl.maximum(slot, 0) * H * K * V + head + _state_offsets(o_k, o_v, K, V, V_FIRST),
             x, mask=m)


def scatter_states(src, rows, state_pool, slots, state_v_first):
    """pool[slots[r]] = src[rows[r]] for every r where both are valid (no host read)."""
    R = rows.numel()
    _, H, K, V = src.shape
    if R == 0 or H == 0 or src.shape[0] == 0:
        return
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    with _device(src):
        _scatter_kernel[(R * H * NK * NV,)](src.contiguous(), rows, state_pool, slots, state_pool.shape[0],
                                            H=H, K=K, V=V, BK=BK, BV=BV, NK=NK, NV=NV,
                                            V_FIRST=bool(state_v_first), num_warps=4)


def recurrent_verify_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, num_accepted_tokens,
                               cu_seqlens, state_v_first, o):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    SLOTS = state_indices.shape[1]
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, 4096 // BK))
    NV = triton.cdiv(V, BV)
    if N * H == 0 or SLOTS == 0:
        o.zero_()
        return
    with _device(q):
        _verify_kernel[(NV * N * H,)](
            q, k, v, g, o, state_pool, state_indices, num_accepted_tokens, cu_seqlens, scale, T,
            state_pool.shape[0], SLOTS=SLOTS, H=H, K=K, V=V, BK=BK, BV=BV, NV=NV,
            V_FIRST=bool(state_v_first), HAS_ACCEPTED=num_accepted_tokens is not None,
            VARLEN=cu_seqlens is not None, num_warps=_warps(BK, BV))


def _inner_backend(q) -> str:
    # the GPU: whichever backend chunk_gla picks (the compiled kernels where built); CPU
    # tensors reach this backend only under the interpreter, where Triton is the point
    return "auto" if q.is_cuda else "triton"


def chunk_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                    final_state_indices, cu_seqlens, checkpoint_every, checkpoint_indices,
                    state_v_first, o):
    from gla_cuda import dispatch  # the backends package does not import dispatch at load

    _, T, H, K = q.shape
    V = v.shape[-1]
    P = state_pool.shape[0]
    N = cu_seqlens.shape[0] - 1
    index = state_indices.long()
    valid = (index >= 0) & (index < P)
    read = valid if has_initial_state is None else valid & has_initial_state
    # gather: every slot is read here, before anything below writes one
    h0 = state_pool.index_select(0, index.clamp(0, max(P - 1, 0)))
    h0 = h0.transpose(-1, -2) if state_v_first else h0
    h0 = torch.where(read[:, None, None, None], h0, 0.).contiguous()

    if checkpoint_indices is None:
        out, ht = dispatch.run("chunk_fwd", q, k, v, g, h0, cu_seqlens, _inner_backend(q),
                               scale, h0, True, cu_seqlens)
        src, rows = ht, torch.arange(N, device=q.device)
        slots = index if final_state_indices is None else final_state_indices.long()
        slots = torch.where(valid, slots, -1)
    else:
        from .chunk import chunk_fwd_states
        out, ht, h = chunk_fwd_states(q, k, v, g, scale, h0, cu_seqlens)
        meta = ChunkSlots(q, cu_seqlens)  # h's slots: checkpoints fall on chunk boundaries
        lens = meta.cu[1:] - meta.cu[:-1]
        chunk_off = meta.chunk_off[:-1]  # each sequence's first slot
        M = checkpoint_indices.shape[1]
        pos = (torch.arange(M, device=q.device) + 1) * checkpoint_every        # [M]
        inside = pos[None, :] < lens[:, None]                                   # a chunk's entry state
        ends = pos[None, :] == lens[:, None]                                    # the final state
        NC = h.shape[0]
        mark_rows = torch.where(inside, chunk_off[:, None] + pos[None, :] // C_CHUNK,
                                torch.where(ends, NC + torch.arange(N, device=q.device)[:, None], -1))
        mark_slots = torch.where(valid[:, None], checkpoint_indices.long(), -1)
        final = index if final_state_indices is None else final_state_indices.long()
        src = torch.cat([h, ht])
        rows = torch.cat([NC + torch.arange(N, device=q.device), mark_rows.flatten()])
        slots = torch.cat([torch.where(valid, final, -1), mark_slots.flatten()])
    scatter_states(src, rows, state_pool, slots.contiguous(), state_v_first)
    # padding sequences: zero output (a packed token's sequence from the offsets)
    seq = token_sequence(cu_seqlens, torch.arange(T, device=q.device))
    keep = valid[seq] if N else torch.zeros(T, dtype=torch.bool, device=q.device)
    o.copy_(torch.where(keep[None, :, None, None], out, 0))
