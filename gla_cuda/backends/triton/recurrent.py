"""Recurrent GLA kernels: decoding and short inputs (semantics: docs/design.md,
'Semantics').

One program owns a [BK, BV] tile of one (sequence, head) state, keeps it in
float32 registers and walks the tokens one at a time. The flat grid is
(V tiles, K tiles, N * H) with V fastest, so the tiles of one head run side by
side and share their q/k/g loads in L2. K is split (forward only) just when
there are too few heads to fill the GPU.

Forward: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

Backward, per (V tile, sequence, head), with S and dS in registers:
  1. forward sweep: recompute S_t, write dq_t = scale * S_t do_t;
  2. reverse sweep: D_t = exp(g_{t+1}) dS_{t+1} (D_T = dht), dS_t = D_t +
     scale * q_t^T do_t, write dk_t, dv_t, dg_t; dh0 = D_0.
dg_t = exp(g_t) * rowsum(dS_t ⊙ S_{t-1}) is accumulated backwards as
  dg_t = q_t ⊙ dq'_t + R_t,   R_t = dg_{t+1} - k_t ⊙ dk'_t,
  R_T = exp(g_T) * rowsum(dht ⊙ S_{T-1}),
with dq'_t = scale * exp(g_t) ⊙ (S_{t-1} do_t) and dk'_t = D_t v_t: dq and dk
without their shared diagonal term scale * q_t k_t <v_t, do_t>. That term
cancels exactly in q ⊙ dq - k ⊙ dk, and dropping it before rounding keeps dg
accurate in relative terms when exp(g) is tiny (g = -20), where the usual
revcumsum(q ⊙ dq - k ⊙ dk) loses every digit. Nothing is divided by exp(g).
The float32 accumulator still carries its rounding along the sequence: the
dg error grows like sqrt(T) * eps (2.6e-6 relative at T = 1000).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_TILE = 4096          # state elements per program: 32 fp32 registers a thread at 4 warps
_MIN_PROGRAMS = 256   # below this (few heads), narrow V tiles, then split K (forward)


def _min_programs() -> int:
    # the interpreter runs programs one after another: fewest, widest tiles there
    return 1 if os.environ.get("TRITON_INTERPRET", "0") == "1" else _MIN_PROGRAMS


def _tiles(K: int, V: int, NH: int, split_k: bool):
    """(BK, BV, NK, NV). A whole K row range per program unless heads are too few."""
    min_programs = _min_programs()
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(32, _TILE // BK))

    def programs():
        return NH * triton.cdiv(K, BK) * triton.cdiv(V, BV)
    while programs() < min_programs and BV > 16:
        BV //= 2
    while split_k and programs() < min_programs and BK > 32:
        BK //= 2  # costs a float32 partial o and a sum over K tiles
    return BK, BV, triton.cdiv(K, BK), triton.cdiv(V, BV)


def _warps(BK: int, BV: int) -> int:
    return max(1, min(8, BK * BV // 1024))


def _device(x: torch.Tensor):
    # Triton launches on the current device, which need not be x's.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@triton.jit
def _bounds(cu_seqlens, i_n, T, VARLEN: tl.constexpr):
    """First token (flat index over B*T) and length of sequence i_n, read on the device."""
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos - bos


@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(q, k, v, g, o, h0, ht, cu_seqlens, scale, T, o_split,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
                USE_H0: tl.constexpr, STORE_HT: tl.constexpr, VARLEN: tl.constexpr):
    pid = tl.program_id(0)
    i_v, i_k, i_nh = pid % NV, (pid // NV) % NK, pid // (NV * NK)
    bos, L = _bounds(cu_seqlens, i_nh // H, T, VARLEN)
    i_h = i_nh % H

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_kv, mask=m_kv, other=0.)
    # masked K rows load k = 0, g = 0: they stay zero and add nothing to o
    p_x = (bos * H + i_h) * K + o_k            # q, k, g
    p_y = (bos * H + i_h) * V + o_v            # v
    p_o = o + i_k.to(tl.int64) * o_split + p_y  # this K tile's partial o when NK > 1
    for _ in range(0, L):
        b_q = tl.load(q + p_x, mask=m_k, other=0.).to(tl.float32) * scale
        b_k = tl.load(k + p_x, mask=m_k, other=0.).to(tl.float32)
        b_g = tl.load(g + p_x, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + p_y, mask=m_v, other=0.).to(tl.float32)
        S = S * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(S * b_q[:, None], 0)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        p_x += H * K
        p_y += H * V
        p_o += H * V
    if STORE_HT:
        tl.store(ht + p_kv, S, mask=m_kv)


@triton.jit
def _bwd_token(q, k, g, v, do, p_x, p_y, m_k, m_v):
    """One token's q, k, exp(g), v and do, in float32 (both sweeps of the backward)."""
    b_q = tl.load(q + p_x, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k + p_x, mask=m_k, other=0.).to(tl.float32)
    b_a = tl.exp(tl.load(g + p_x, mask=m_k, other=0.).to(tl.float32))
    b_v = tl.load(v + p_y, mask=m_v, other=0.).to(tl.float32)
    b_do = tl.load(do + p_y, mask=m_v, other=0.).to(tl.float32)
    return b_q, b_k, b_a, b_v, b_do


@triton.jit(do_not_specialize=["T"])
def _bwd_kernel(q, k, v, g, do, h0, dht, cu_seqlens, dq, dk, dv, dg, dh0, scale, T, k_split,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                USE_H0: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                VARLEN: tl.constexpr):
    pid = tl.program_id(0)
    i_v, i_nh = pid % NV, pid // NV
    bos, L = _bounds(cu_seqlens, i_nh // H, T, VARLEN)
    i_h = i_nh % H

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    p_x0 = (bos * H + i_h) * K + o_k           # q, k, g and the K-sized gradients
    p_y0 = (bos * H + i_h) * V + o_v           # v, do, dv
    # dq, dk, dg are sums over V: each V tile writes its own float32 partial
    part = i_v.to(tl.int64) * k_split
    dq += part
    dk += part
    dg += part

    # 1. forward sweep: dq_t, and q_t ⊙ dq'_t parked in dg for the reverse sweep
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_kv, mask=m_kv, other=0.)
    r_last = tl.zeros([BK], dtype=tl.float32)  # R_T
    p_x, p_y = p_x0, p_y0
    for t in range(0, L):
        b_q, b_k, b_a, b_v, b_do = _bwd_token(q, k, g, v, do, p_x, p_y, m_k, m_v)
        b_dqp = scale * b_a * tl.sum(S * b_do[None, :], 1)
        if USE_DHT:
            if t == L - 1:  # the only step that still holds S_{T-1}
                r_last = b_a * tl.sum(S * tl.load(dht + p_kv, mask=m_kv, other=0.), 1)
        S = S * b_a[:, None] + b_k[:, None] * b_v[None, :]
        tl.store(dq + p_x, b_dqp + scale * b_k * tl.sum(b_v * b_do), mask=m_k)
        tl.store(dg + p_x, b_q * b_dqp, mask=m_k)
        p_x += H * K
        p_y += H * V
    # phase 2 reads dg slots that other threads of this program wrote
    tl.debug_barrier()

    # 2. reverse sweep
    D = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        D += tl.load(dht + p_kv, mask=m_kv, other=0.)
    b_dg = r_last
    p_x = p_x0 + (L - 1) * H * K
    p_y = p_y0 + (L - 1) * H * V
    for i in range(0, L):
        b_q, b_k, b_a, b_v, b_do = _bwd_token(q, k, g, v, do, p_x, p_y, m_k, m_v)
        b_dkp = tl.sum(D * b_v[None, :], 1)
        # dg_{t+1} -> R_t -> dg_t; at t = T, R_T came from the forward sweep
        b_dg = tl.where(i > 0, b_dg - b_k * b_dkp, b_dg)
        b_dg += tl.load(dg + p_x, mask=m_k, other=0.)
        tl.store(dg + p_x, b_dg, mask=m_k)
        dS = D + (scale * b_q)[:, None] * b_do[None, :]
        tl.store(dk + p_x, b_dkp + scale * b_q * tl.sum(b_do * b_v), mask=m_k)
        b_dv = tl.sum(dS * b_k[:, None], 0)
        tl.store(dv + p_y, b_dv.to(dv.dtype.element_ty), mask=m_v)
        D = dS * b_a[:, None]
        p_x -= H * K
        p_y -= H * V
    if STORE_DH0:
        tl.store(dh0 + p_kv, D, mask=m_kv)


def _num_seqs(q, cu_seqlens) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def recurrent_fwd(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    BK, BV, NK, NV = _tiles(K, V, N * H, split_k=True)
    # K tiles each write a float32 partial o, summed below
    o = v.new_empty((NK, *v.shape) if NK > 1 else v.shape, dtype=torch.float32 if NK > 1 else v.dtype)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    grid = (NV * NK * N * H,)
    if grid[0]:
        with _device(q):
            _fwd_kernel[grid](
                q, k, v, g, o, initial_state, ht, cu_seqlens, scale, T, B * T * H * V,
                H=H, K=K, V=V, BK=BK, BV=BV, NK=NK, NV=NV,
                USE_H0=initial_state is not None, STORE_HT=ht is not None,
                VARLEN=cu_seqlens is not None, num_warps=_warps(BK, BV))
    if NK > 1:
        o = o.sum(0).to(v.dtype)
    return o, ht


def recurrent_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    BK, BV, _, NV = _tiles(K, V, N * H, split_k=False)
    # dq, dk, dg: one float32 partial per V tile, summed below
    shape = (NV, *q.shape) if NV > 1 else q.shape
    dq, dk, dg = (q.new_empty(shape, dtype=torch.float32) for _ in range(3))
    dv = torch.empty_like(v)
    dh0 = torch.empty_like(initial_state) if initial_state is not None else None
    grid = (NV * N * H,)
    if grid[0]:
        with _device(q):
            _bwd_kernel[grid](
                q, k, v, g, do, initial_state, dht, cu_seqlens, dq, dk, dv, dg, dh0,
                scale, T, B * T * H * K,
                H=H, K=K, V=V, BK=BK, BV=BV, NV=NV,
                USE_H0=initial_state is not None, USE_DHT=dht is not None,
                STORE_DH0=dh0 is not None, VARLEN=cu_seqlens is not None,
                num_warps=_warps(BK, BV))
    if NV > 1:
        dq, dk, dg = dq.sum(0), dk.sum(0), dg.sum(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), dh0
