"""PyTorch reference: the ground truth and the CPU kernel.

Two implementations of the same contract (see ``gla_cuda/backends/__init__.py``):

* ``naive_*``: the recurrence (docs/design.md, 'Semantics') step by step. Run on float64
  inputs it is the test oracle; it is also the CPU kernel of the recurrent ops.
* ``chunk_*``: the chunked form (docs/design.md, 'The chunked form and its
  numerics'; chunks of ``CHUNK`` tokens), the
  CPU kernel of the chunked ops. Intra-chunk scores are computed element-wise
  with every exponent ``<= 0`` (masked before ``exp``), so any finite ``g <= 0``
  is safe; gates at or below GATE_MIN (-inf included) are resets (the contract's
  gate rule): they are taken out of the cumulative sums and every decay spanning one
  is masked to 0, so the result is exact in any precision.

Everything is computed in float32 (float64 for float64 inputs) in the layout
``[B, H, T, D]``; outputs are cast back to the contract's dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from gla_cuda.backends import GATE_MIN, compute_dtype

CHUNK = 64


def unsupported_reason(op, q, k, v, g, initial_state, cu_seqlens) -> Optional[str]:
    return None  # runs anything on any device


def _acc_dtype(x: Tensor) -> torch.dtype:
    return compute_dtype(x.dtype)


def _sequences(q: Tensor, cu_seqlens: Optional[Tensor]):
    """Yields (n, batch index or None, start, end) for every sequence.

    The reference is allowed to synchronise with the host: it reads cu_seqlens.
    """
    if cu_seqlens is None:
        for n in range(q.shape[0]):
            yield n, n, 0, q.shape[1]
    else:
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            yield n, 0, bounds[n], bounds[n + 1]


def _heads_first(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[T, H, D] -> [H, T, D] in the accumulation dtype."""
    return x.transpose(0, 1).to(dtype)


# ----------------------------------------------------------------------------
# Naive recurrence
# ----------------------------------------------------------------------------

def _naive_seq_fwd(q, k, v, g, scale, h0):
    """One sequence, [H, T, D] inputs. Returns o [H, T, V] and S_T [H, K, V]."""
    H, T, K = q.shape
    S = h0.clone() if h0 is not None else q.new_zeros(H, K, v.shape[-1])
    o = q.new_empty(H, T, v.shape[-1])
    for t in range(T):
        S = g[:, t, :, None].exp() * S + k[:, t, :, None] * v[:, t, None, :]
        o[:, t] = scale * torch.einsum("hk,hkv->hv", q[:, t], S)
    return o, S


def naive_fwd(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    acc = _acc_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(B, T, H, V, dtype=acc, device=q.device)
    ht = []
    for n, b, s, e in _sequences(q, cu_seqlens):
        h0 = initial_state[n].to(acc) if initial_state is not None else None
        o_n, S = _naive_seq_fwd(*(_heads_first(x[b, s:e], acc) for x in (q, k, v, g)), scale, h0)
        o[b, s:e] = o_n.transpose(0, 1)
        ht.append(S)
    return o.to(v.dtype), _final(ht, q, v) if output_final_state else None


def _final(states: list, q: Tensor, v: Tensor) -> Tensor:
    """The final states [N, H, K, V] (float32; float64 inputs: float64), N = 0 included."""
    if states:
        return torch.stack(states)
    return q.new_zeros(0, q.shape[2], q.shape[3], v.shape[-1], dtype=_acc_dtype(q))


def _naive_seq_bwd(q, k, v, g, scale, h0, do, dht):
    """One sequence, [H, T, D] inputs. Returns dq, dk, dv, dg, dh0 (the formulas of
    docs/design.md, 'Semantics')."""
    H, T, K = q.shape
    V = v.shape[-1]
    # forward sweep: dq_t = scale * S_t do_t, keeping S_{t-1} for dg
    S = h0.clone() if h0 is not None else q.new_zeros(H, K, V)
    dq = torch.empty_like(q)
    prev = []
    for t in range(T):
        prev.append(S)
        S = g[:, t, :, None].exp() * S + k[:, t, :, None] * v[:, t, None, :]
        dq[:, t] = scale * torch.einsum("hkv,hv->hk", S, do[:, t])
    # reverse sweep over the state gradient dS_t
    dS = dht.clone() if dht is not None else q.new_zeros(H, K, V)
    dk, dv, dg = torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)
    for t in reversed(range(T)):
        dS = dS + scale * q[:, t, :, None] * do[:, t, None, :]
        dk[:, t] = torch.einsum("hkv,hv->hk", dS, v[:, t])
        dv[:, t] = torch.einsum("hkv,hk->hv", dS, k[:, t])
        # exact, no cancellation: dg_t = exp(g_t) * rowsum(dS_t * S_{t-1})
        dg[:, t] = g[:, t].exp() * (dS * prev[t]).sum(-1)
        dS = g[:, t, :, None].exp() * dS
    return dq, dk, dv, dg, dS


def _bwd_driver(seq_bwd, q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    """Runs a per-sequence backward over every sequence and casts the results."""
    acc = _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk, dg = torch.zeros_like(dq), torch.zeros_like(dq)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dh0 = torch.zeros_like(initial_state) if initial_state is not None else None
    for n, b, s, e in _sequences(q, cu_seqlens):
        h0 = initial_state[n].to(acc) if initial_state is not None else None
        dht_n = dht[n].to(acc) if dht is not None else None
        ins = (_heads_first(x[b, s:e], acc) for x in (q, k, v, g, do))
        grads = seq_bwd(*ins, scale=scale, h0=h0, dht=dht_n)
        for dst, src in zip((dq, dk, dv, dg), grads[:4]):
            dst[b, s:e] = src.transpose(0, 1)
        if dh0 is not None:
            dh0[n] = grads[4]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dh0


def naive_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    def seq(q, k, v, g, do, scale, h0, dht):
        return _naive_seq_bwd(q, k, v, g, scale, h0, do, dht)
    return _bwd_driver(seq, q, k, v, g, scale, initial_state, cu_seqlens, do, dht)


# ----------------------------------------------------------------------------
# Chunked form
# ----------------------------------------------------------------------------

def _chunk_views(x: Tensor, C: int) -> list[Tensor]:
    return list(torch.split(x, C, dim=1)) if x.shape[1] else []


def _gates(gc: Tensor):
    """(b, r) of one chunk [H, C, K]: b the in-chunk cumulative sum of the gates with the
    resets (g <= GATE_MIN, -inf included) taken out, r the number of resets so far. The
    decay from s to t (s <= t) is exp(b_t - b_s) where r_t == r_s, else 0."""
    reset = gc <= GATE_MIN
    return gc.masked_fill(reset, 0).cumsum(1), reset.to(torch.int32).cumsum(1)


def _decay(bt: Tensor, rt: Tensor, bs: Tensor, rs: Tensor, keep=None) -> Tensor:
    """exp(bt - bs) where no reset lies between (rt == rs) and ``keep`` (if given) holds,
    else 0; masked before exp, so that every exponent taken is <= 0."""
    drop = rt != rs
    if keep is not None:
        drop = drop | ~keep
    return (bt - bs).masked_fill(drop, float("-inf")).exp()


def _intra_decay(bc: Tensor, rc: Tensor) -> Tensor:
    """exp(b_t - b_s) for s <= t with no reset in (s, t], else 0: [H, C, C, K]."""
    C = bc.shape[1]
    causal = torch.ones(C, C, dtype=torch.bool, device=bc.device).tril()
    return _decay(bc[:, :, None, :], rc[:, :, None, :], bc[:, None, :, :], rc[:, None, :, :],
                  causal[None, :, :, None])


def _chunk_seq_fwd(q, k, v, g, scale, h0, C=CHUNK):
    """One sequence, [H, T, D] inputs. Returns o, S_T and the state entering each chunk."""
    H, T, K = q.shape
    S = h0.clone() if h0 is not None else q.new_zeros(H, K, v.shape[-1])
    outs, states = [], []
    for qc, kc, vc, gc in zip(*(_chunk_views(x, C) for x in (q, k, v, g))):
        states.append(S)
        bc, rc = _gates(gc)
        zero = torch.zeros_like(bc[:, :1])
        from_start = _decay(bc, rc, zero, zero.to(rc.dtype))           # exp(b_t): start -> t
        to_end = _decay(bc[:, -1:], rc[:, -1:], bc, rc)                 # exp(Γ - b_s): s -> end
        gamma = from_start[:, -1]                                       # exp(Γ)
        scores = torch.einsum("htk,hsk,htsk->hts", qc, kc, _intra_decay(bc, rc))
        outs.append(scale * (scores @ vc + (qc * from_start) @ S))
        S = gamma[:, :, None] * S + (kc * to_end).transpose(1, 2) @ vc
    o = torch.cat(outs, 1) if outs else q.new_empty(H, 0, v.shape[-1])
    return o, S, states


def chunk_fwd(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    acc = _acc_dtype(q)
    B, T, H, K = q.shape
    o = torch.empty(B, T, H, v.shape[-1], dtype=acc, device=q.device)
    ht = []
    for n, b, s, e in _sequences(q, cu_seqlens):
        h0 = initial_state[n].to(acc) if initial_state is not None else None
        o_n, S, _ = _chunk_seq_fwd(*(_heads_first(x[b, s:e], acc) for x in (q, k, v, g)), scale, h0)
        o[b, s:e] = o_n.transpose(0, 1)
        ht.append(S)
    return o.to(v.dtype), _final(ht, q, v) if output_final_state else None


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """sum over indices < i (not cumsum - x, which cancels when x dominates)."""
    shifted = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.shape[dim] - 1)], dim)
    return shifted.cumsum(dim)


def _chunk_seq_bwd(q, k, v, g, do, scale, h0, dht, C=CHUNK):
    """One sequence, [H, T, D] inputs; recomputes the chunk states, then walks back.

    dg_t sums every product whose decay spans step t (a pair s < t <= u), so no
    large terms cancel: reverse cumsums of q*dq - k*dk would lose dg to rounding
    when gates are strong.
    """
    H, T, K = q.shape
    _, _, states = _chunk_seq_fwd(q, k, v, g, scale, h0, C)
    dS = dht.clone() if dht is not None else q.new_zeros(H, K, v.shape[-1])
    dq, dk, dv, dg = [], [], [], []
    chunks = list(zip(*(_chunk_views(x, C) for x in (q, k, v, g, do))))
    for (qc, kc, vc, gc, doc), S in zip(reversed(chunks), reversed(states)):
        n = qc.shape[1]
        bc, rc = _gates(gc)
        zero = torch.zeros_like(bc[:, :1])
        from_start = _decay(bc, rc, zero, zero.to(rc.dtype))  # exp(b_t)
        state_decay = _decay(bc[:, -1:], rc[:, -1:], bc, rc)  # exp(Γ - b_s)
        gamma = from_start[:, -1]                             # exp(Γ)
        decay = _intra_decay(bc, rc)                          # [H, u, s, K]
        dov = scale * doc @ vc.transpose(1, 2)                # [H, u, s]: scale <do_u, v_s>
        scores = torch.einsum("htk,hsk,htsk->hts", qc, kc, decay)
        dq_inter = scale * (doc @ S.transpose(1, 2)) * from_start
        dk_state = (vc @ dS.transpose(1, 2)) * state_decay
        dq.append(torch.einsum("hts,hsk,htsk->htk", dov, kc, decay) + dq_inter)
        dk.append(torch.einsum("hts,htk,htsk->hsk", dov, qc, decay) + dk_state)
        dv.append(scale * scores.transpose(1, 2) @ doc + (kc * state_decay) @ dS)
        # dg_t: pairs (u >= t, s < t) inside the chunk, S -> o_u for u >= t,
        # k_s -> S_end for s < t, and S -> S_end. Every term spans step t, so each is 0
        # where g_t is a reset (its decay is masked): dg is 0 there, exactly.
        pair = dov[..., None] * qc[:, :, None] * kc[:, None] * decay       # [H, u, s, K]
        before_t = _exclusive_cumsum(pair, 2)                               # sum over s < t
        upper = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # u >= t
        cross = (before_t * upper[None, :, :, None]).sum(1)
        from_state = (qc * dq_inter).flip(1).cumsum(1).flip(1)
        to_state = _exclusive_cumsum(kc * dk_state, 1)
        through = (gamma[:, :, None] * S * dS).sum(-1)[:, None]
        dg.append(cross + from_state + to_state + through)
        dS = gamma[:, :, None] * dS + scale * (qc * from_start).transpose(1, 2) @ doc
    cat = lambda xs, like: torch.cat(xs[::-1], 1) if xs else torch.empty_like(like)
    return cat(dq, q), cat(dk, k), cat(dv, v), cat(dg, g), dS


def chunk_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    return _bwd_driver(_chunk_seq_bwd, q, k, v, g, scale, initial_state, cu_seqlens, do, dht)


# The recurrent ops share the contract; on the reference backend they run the naive loop.
recurrent_fwd = naive_fwd
recurrent_bwd = naive_bwd


def recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index, state_v_first):
    """The pooled decode step as gather, recurrence, scatter. Selecting the rows with a
    state reads state_index on the host (a synchronisation on the GPU; the CUDA backend
    has none)."""
    index = state_index.long()
    rows = ((index >= 0) & (index < state_pool.shape[0])).nonzero().squeeze(1)
    slots = index[rows]
    h0 = state_pool[slots]
    h0 = h0.transpose(-1, -2) if state_v_first else h0
    o_rows, ht = naive_fwd(q[rows], k[rows], v[rows], g[rows], scale, h0.contiguous(), True)
    o = torch.zeros_like(v)
    o[rows] = o_rows
    state_pool[slots] = (ht.transpose(-1, -2) if state_v_first else ht).to(state_pool.dtype)
    return o


def recurrent_gv_fwd(q, k, v, gk, gv, scale, initial_state, output_final_state, reverse, cu_seqlens):
    """The recurrence with a value gate too, S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) +
    k_t^T v_t, optionally from each sequence's last token back (reverse). Written with
    out-of-place ops only, so autograd differentiates it (fla's fused_recurrent_gla options)."""
    acc = _acc_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    outs, finals = [], []
    for n, b, s, e in _sequences(q, cu_seqlens):
        qn, kn, vn, gkn, gvn = (_heads_first(x[b, s:e], acc) for x in (q, k, v, gk, gv))
        S = initial_state[n].to(acc) if initial_state is not None else q.new_zeros(H, K, V, dtype=acc)
        steps = [None] * (e - s)
        for t in (reversed(range(e - s)) if reverse else range(e - s)):
            S = gkn[:, t, :, None].exp() * S * gvn[:, t, None, :].exp() + kn[:, t, :, None] * vn[:, t, None, :]
            steps[t] = scale * torch.einsum("hk,hkv->hv", qn[:, t], S)
        outs.append(torch.stack(steps, 1).transpose(0, 1) if steps else q.new_zeros(0, H, V, dtype=acc))
        finals.append(S)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    return o.to(v.dtype), (torch.stack(finals) if output_final_state and finals else
                           q.new_zeros(0, H, K, V, dtype=acc) if output_final_state else None)


def _pool_io(state_pool, state_v_first, acc):
    """(load(slot) -> [H, K, V] state in acc, store(slot, S)) for either pool layout."""
    def load(slot):
        S = state_pool[slot]
        return (S.transpose(-1, -2) if state_v_first else S).to(acc)

    def store(slot, S):
        state_pool[slot] = (S.transpose(-1, -2) if state_v_first else S).to(state_pool.dtype)
    return load, store


def chunk_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                    final_state_indices, cu_seqlens, checkpoint_every, checkpoint_indices,
                    state_v_first, o):
    """Serving prefill (semantics: gla_cuda/serving.py, chunk_gla_pooled) sequence by
    sequence in the chunked form; reads the index tensors on the host. Every slot is read
    before any is written."""
    acc = _acc_dtype(q)
    P = state_pool.shape[0]
    ok = lambda i: 0 <= i < P
    load, store = _pool_io(state_pool, state_v_first, acc)
    bounds = cu_seqlens.tolist()
    index = state_indices.tolist()
    N = len(index)
    has = has_initial_state.tolist() if has_initial_state is not None else [True] * N
    final = final_state_indices.tolist() if final_state_indices is not None else index
    marks = checkpoint_indices.tolist() if checkpoint_indices is not None else [[]] * N
    h0 = [load(index[n]) if ok(index[n]) and has[n] else None for n in range(N)]
    writes = []
    for n in range(N):
        s, e = bounds[n], bounds[n + 1]
        if not ok(index[n]):  # padding: zeros out, nothing read or written
            o[0, s:e] = 0
            continue
        o_n, S, states = _chunk_seq_fwd(*(_heads_first(x[0, s:e], acc) for x in (q, k, v, g)), scale, h0[n])
        o[0, s:e] = o_n.transpose(0, 1).to(o.dtype)
        if ok(final[n]):
            writes.append((final[n], S))
        for j, slot in enumerate(marks[n]):
            pos = (j + 1) * checkpoint_every  # tokens of this sequence consumed
            if pos > e - s:
                break
            if ok(slot):
                writes.append((slot, states[pos // CHUNK] if pos < e - s else S))
    for slot, S in writes:
        store(slot, S)


def recurrent_verify_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, num_accepted_tokens,
                               cu_seqlens, state_v_first, o):
    """Speculative-decoding verify (semantics: gla_cuda/serving.py,
    fused_recurrent_gla_verify_pooled): the naive recurrence per row, the state after every
    token stored to that token's slot; reads the index tensors on the host."""
    acc = _acc_dtype(q)
    P = state_pool.shape[0]
    ok = lambda i: 0 <= i < P
    load, store = _pool_io(state_pool, state_v_first, acc)
    index = state_indices.tolist()
    N, slots = len(index), state_indices.shape[1]
    accepted = num_accepted_tokens.tolist() if num_accepted_tokens is not None else [1] * N
    rows = list(_sequences(q, cu_seqlens))
    start = [index[n][accepted[n] - 1] if 1 <= accepted[n] <= slots else -1 for n in range(N)]
    h0 = [load(start[n]) if ok(start[n]) else None for n in range(N)]
    writes = []
    for n, b, s, e in rows:
        if h0[n] is None:  # padding row: zeros out, nothing read or written
            o[b, s:e] = 0
            continue
        qn, kn, vn, gn = (_heads_first(x[b, s:e], acc) for x in (q, k, v, g))
        S = h0[n].clone()
        for t in range(e - s):
            S = gn[:, t, :, None].exp() * S + kn[:, t, :, None] * vn[:, t, None, :]
            o[b, s + t] = (scale * torch.einsum("hk,hkv->hv", qn[:, t], S)).to(o.dtype)
            if t < slots and ok(index[n][t]):
                writes.append((index[n][t], S))
    for slot, S in writes:
        store(slot, S)


# ----------------------------------------------------------------------------
# The GLA layer's swish-gated RMSNorm (gla::rms_norm_gated)
# ----------------------------------------------------------------------------

def rms_norm_gated_fwd(x, gate, weight, eps):
    """y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate) in float32 (float64 stays float64)."""
    ct = _acc_dtype(x)
    y = x.to(ct)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if gate is not None:
        y = y * torch.nn.functional.silu(gate.to(ct))
    return y.to(x.dtype).contiguous()


def rms_norm_gated_bwd(dy, x, gate, weight, eps):
    """(dx, dgate or None, dweight or None) of rms_norm_gated_fwd, same precision."""
    ct = _acc_dtype(x)
    xf, dyf = x.to(ct), dy.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xh = xf * rstd
    w = weight.to(ct) if weight is not None else None
    dgate = None
    if gate is not None:
        gf = gate.to(ct)
        sg = torch.sigmoid(gf)
        dgate = dyf * (xh if w is None else xh * w) * sg * (1 + gf * (1 - sg))
        dyf = dyf * gf * sg
    dweight = (dyf * xh).reshape(-1, x.shape[-1]).sum(0) if w is not None else None
    dxh = dyf if w is None else dyf * w
    dx = rstd * (dxh - xh * (dxh * xh).mean(-1, keepdim=True))
    return (dx.to(x.dtype).contiguous(),
            None if dgate is None else dgate.to(gate.dtype).contiguous(),
            None if dweight is None else dweight.to(weight.dtype))
