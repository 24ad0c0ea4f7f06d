"""Chunked GLA in Triton: forward and backward (DESIGN §1-§3).

Layout: every tensor is viewed as packed tokens ``[B*T, H, D]``; a batch without
``cu_seqlens`` is the packed batch with boundaries ``0, T, 2T, ...``.  Time is cut
into chunks of ``C = 64`` tokens per sequence; a chunk "slot" is the chunk's index
in the packed list of all chunks of all sequences.  The map slot -> sequence is
built on the device (``searchsorted`` over the cumulative chunk counts), so the
grids are sized from shapes only (``<= cdiv(T, C) + N`` slots) and nothing ever
synchronises with the host; surplus programs find no rows and store nothing.

Kernels
-------
``_intra_A``      per (slot, head): the intra-chunk scores
                  ``A[t, s] = scale * sum_k q_tk k_sk exp(b_tk - b_sk)`` (s <= t),
                  float32 ``[B*T, H, C]``.  Off-diagonal 16x16 sub-blocks go through
                  tensor cores with a reference row per sub-block (every exponent
                  <= 0); diagonal sub-blocks are computed element-wise in float32.
``_state_fwd``    per (sequence, head, K tile, V tile): walks the chunks with the
                  state tile in registers.  Forward with K <= 128 (one K tile): it
                  also writes ``o`` (fused forward, no state ever touches HBM).
                  Otherwise it stores the state entering every chunk (``h``).
``_out``          per (slot, head, V tile): ``o`` from ``h`` and ``A`` (K > 128).
``_state_bwd``    per (sequence, head, K tile, V tile): reverse walk of the state
                  gradient; stores the gradient w.r.t. every chunk's final state
                  (``dh``) and ``dh0``; with one K tile it also writes ``dv``.
``_dv``           per (slot, head, V tile): ``dv`` when K needs several tiles.
``_dqk``          per (slot, head, K tile): ``dq``, ``dk`` and ``dg``.  ``dg`` is
                  chunk-local (no sequence-long cumulative sum):
                  ``dg_t = sum_{u >= t} (q dq - k dk_intra)_u + sum_{s < t} (k dk_inter)_s
                  + exp(Gamma) rowsum(S_in * dS_end)`` over the chunk, which is
                  ``sum_{u >= t} (q dq - k dk)_u + rowsum(S_end * dS_end)`` with the
                  terms that cancel exactly taken out (the s == u terms of the intra
                  part, the in-chunk part of S_end), and both sums taken as float32
                  triangular products: dg stays accurate for gates of -20 per step.

Every exponent is masked to be <= 0 before ``exp``; all accumulation is float32.
Token indices are int32 inside the kernels (B*T < 2**31), addresses int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

C_CHUNK = 64   # tokens per chunk; sub-blocks of 16 tokens (secondary chunking)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ieee(dtype) -> bool:
    """float32 dots (operands not rounded) for float32 inputs, and for bfloat16 in the
    interpreter: its dot multiplies bfloat16 bit patterns as integers, and its float32 ->
    bfloat16 conversion truncates (biased) where the GPU rounds to nearest."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _np2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


# ----------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------

@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation; IEEE: exact float32 products (float32 inputs, and
    the interpreter, whose dot cannot multiply bfloat16 operands)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _bcast_row(x, c, C: tl.constexpr, BK: tl.constexpr):
    """y[t, :] = x[16 * (t // 16) + c, :] for a [C, BK] register tile."""
    x3 = tl.reshape(x, (C // 16, 16, BK))
    j = tl.arange(0, 16)
    sel = tl.sum(tl.where((j == c)[None, :, None], x3, 0.0), axis=1)
    y3 = tl.broadcast_to(sel[:, None, :], (C // 16, 16, BK))
    return tl.reshape(y3, (C, BK))


@triton.jit
def _row(x, rows, r):
    """x[r, :] of a register tile as a vector (r is a scalar)."""
    return tl.sum(tl.where((rows == r)[:, None], x, 0.0), axis=0)


@triton.jit
def _slot_info(chunk_seq, chunk_off, cu, slot, N, C: tl.constexpr):
    """(sequence n, first token t0, rows of this chunk that exist, chunk count of n, is last)."""
    n = tl.load(chunk_seq + slot)
    ok = n < N
    n = tl.minimum(n, N - 1)
    bos = tl.load(cu + n).to(tl.int32)
    eos = tl.load(cu + n + 1).to(tl.int32)
    c = (slot - tl.load(chunk_off + n)).to(tl.int32)
    t0 = bos + c * C
    nrow = tl.where(ok, eos - t0, 0)
    nc = (eos - bos + C - 1) // C
    return n, t0.to(tl.int64), nrow, (c == nc - 1) | (ok == 0)


# ----------------------------------------------------------------------------
# Intra-chunk scores A (forward and backward)
# ----------------------------------------------------------------------------

@triton.jit
def _intra_A_kernel(q, k, g, A, cu, chunk_seq, chunk_off, scale, N, H, K,
                    C: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    n, t0, nrow, _ = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    DT = q.dtype.element_ty
    if IEEE:
        DT = tl.float32
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    ok = (t0 * H + hh) * K
    roff = rows * (H * K)
    acc = tl.zeros((C, C), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        m = rmask[:, None] & kmask[None, :]
        p = roff[:, None] + kk[None, :]
        bq = tl.load(q + ok + p, mask=m, other=0.).to(tl.float32)
        bk = tl.load(k + ok + p, mask=m, other=0.).to(tl.float32)
        bg = tl.load(g + ok + p, mask=m, other=0.).to(tl.float32)
        b = tl.cumsum(bg, axis=0)
        # off-diagonal sub-blocks: reference row = first row of the row sub-block
        for i in tl.static_range(1, C // 16):
            br = _row(b, rows, 16 * i)
            inb = (rows // 16) == i
            before = rows < 16 * i
            qt = tl.where(inb[:, None], bq * tl.exp(tl.where(inb[:, None], b - br[None, :], 0.)), 0.)
            kt = tl.where(before[:, None], bk * tl.exp(tl.where(before[:, None], br[None, :] - b, 0.)), 0.)
            acc += _mm(qt.to(DT), tl.trans(kt.to(DT)), IEEE)
        # diagonal sub-blocks, element-wise in float32
        for cc in range(16):
            srow = (rows // 16) * 16 + cc
            valid = (rows % 16) >= cc
            ks = tl.load(k + (t0 * H + hh) * K + (srow * (H * K))[:, None] + kk[None, :],
                         mask=(srow < nrow)[:, None] & kmask[None, :], other=0.).to(tl.float32)
            bs = _bcast_row(b, cc, C, BK)
            e = tl.exp(tl.where(valid[:, None], b - bs, 0.))
            val = tl.where(valid, tl.sum(bq * ks * e, axis=1), 0.)
            acc += tl.where(cols[None, :] == srow[:, None], val[:, None], 0.)
    acc = acc * scale
    tl.store(A + (t0 * H + hh) * C + (rows * (H * C))[:, None] + cols[None, :], acc, mask=rmask[:, None])


# ----------------------------------------------------------------------------
# Forward state walk (fused output when K fits one tile)
# ----------------------------------------------------------------------------

@triton.jit
def _state_fwd_kernel(q, k, v, g, A, o, h, h0, ht, cu, chunk_off, scale, N, H, K, V,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                      FUSE_O: tl.constexpr, STORE_H: tl.constexpr, USE_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, IEEE: tl.constexpr):
    # program id -> (sequence, head, K tile, V tile); the tiles of one (sequence, head)
    # are neighbours, so they run together and share q/k/g/v through L2
    NT = tl.cdiv(K, BK) * NV
    pid = tl.program_id(0)
    tile = pid % NT
    n = (pid // NT // H).to(tl.int64)
    hh = (pid // NT % H).to(tl.int64)
    kt = tile // NV
    vt = tile % NV
    DT = q.dtype.element_ty
    if IEEE:
        DT = tl.float32
    # token indices in int32 (row masks stay 32-bit: fewer registers); addresses in int64
    bos = tl.load(cu + n).to(tl.int32)
    eos = tl.load(cu + n + 1).to(tl.int32)
    slot0 = tl.load(chunk_off + n).to(tl.int64)
    nc = (eos - bos + C - 1) // C
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    kk = kt * BK + tl.arange(0, BK)
    vv = vt * BV + tl.arange(0, BV)
    kmask = kk < K
    vmask = vv < V
    smask = kmask[:, None] & vmask[None, :]
    soff = kk[:, None] * V + vv[None, :]
    if USE_H0:
        S = tl.load(h0 + (n * H + hh) * K * V + soff, mask=smask, other=0.).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    for c in range(0, nc):
        t0 = bos + c * C
        rmask = rows < eos - t0
        t0 = t0.to(tl.int64)
        if STORE_H:
            tl.store(h + ((slot0 + c) * H + hh) * K * V + soff, S.to(h.dtype.element_ty), mask=smask)
        ok = (t0 * H + hh) * K
        rk = rows * (H * K)
        ov = (t0 * H + hh) * V
        rv = rows * (H * V)
        mk = rmask[:, None] & kmask[None, :]
        mv = rmask[:, None] & vmask[None, :]
        bk = tl.load(k + ok + rk[:, None] + kk[None, :], mask=mk, other=0.)
        bg = tl.load(g + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
        bv = tl.load(v + ov + rv[:, None] + vv[None, :], mask=mv, other=0.)
        b = tl.cumsum(bg, axis=0)
        gam = _row(b, rows, C - 1)
        if FUSE_O:
            bq = tl.load(q + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
            bA = tl.load(A + (t0 * H + hh) * C + (rows * (H * C))[:, None] + cols[None, :],
                         mask=rmask[:, None], other=0.)
            qs = (bq * tl.exp(b) * scale).to(DT)
            bo = _mm(qs, S.to(DT), IEEE) + _mm(bA.to(DT), bv, IEEE)
            tl.store(o + ov + rv[:, None] + vv[None, :], bo.to(o.dtype.element_ty), mask=mv)
        kd = (bk.to(tl.float32) * tl.exp(gam[None, :] - b)).to(DT)
        S = S * tl.exp(gam)[:, None] + _mm(tl.trans(kd), bv, IEEE)
    if STORE_HT:
        tl.store(ht + (n * H + hh) * K * V + soff, S, mask=smask)


@triton.jit
def _out_kernel(q, v, g, A, o, h, cu, chunk_seq, chunk_off, scale, N, H, K, V,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    NVT = tl.cdiv(V, BV)
    slot = (tl.program_id(0) // NVT).to(tl.int64)
    vt = tl.program_id(0) % NVT
    hh = tl.program_id(1).to(tl.int64)
    n, t0, nrow, _ = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    DT = q.dtype.element_ty
    if IEEE:
        DT = tl.float32
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    vv = vt * BV + tl.arange(0, BV)
    vmask = vv < V
    ov = (t0 * H + hh) * V
    rv = rows * (H * V)
    mv = rmask[:, None] & vmask[None, :]
    bv = tl.load(v + ov + rv[:, None] + vv[None, :], mask=mv, other=0.)
    bA = tl.load(A + (t0 * H + hh) * C + (rows * (H * C))[:, None] + cols[None, :], mask=rmask[:, None], other=0.)
    acc = _mm(bA.to(DT), bv, IEEE)
    ok = (t0 * H + hh) * K
    rk = rows * (H * K)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        mk = rmask[:, None] & kmask[None, :]
        bq = tl.load(q + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
        bg = tl.load(g + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
        b = tl.cumsum(bg, axis=0)
        bh = tl.load(h + (slot * H + hh) * K * V + kk[:, None] * V + vv[None, :],
                     mask=kmask[:, None] & vmask[None, :], other=0.)
        acc += _mm((bq * tl.exp(b) * scale).to(DT), bh.to(DT), IEEE)
    tl.store(o + ov + rv[:, None] + vv[None, :], acc.to(o.dtype.element_ty), mask=mv)


# ----------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------

@triton.jit
def _state_bwd_kernel(q, k, g, do, A, dv, dh, dht, dh0, cu, chunk_off, scale, N, H, K, V,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                      FUSE_DV: tl.constexpr, STORE_DH: tl.constexpr, USE_DHT: tl.constexpr,
                      STORE_DH0: tl.constexpr, IEEE: tl.constexpr):
    # program id -> (sequence, head, K tile, V tile); the tiles of one (sequence, head)
    # are neighbours, so they run together and share q/k/g/v through L2
    NT = tl.cdiv(K, BK) * NV
    pid = tl.program_id(0)
    tile = pid % NT
    n = (pid // NT // H).to(tl.int64)
    hh = (pid // NT % H).to(tl.int64)
    kt = tile // NV
    vt = tile % NV
    DT = q.dtype.element_ty
    if IEEE:
        DT = tl.float32
    # token indices in int32 (row masks stay 32-bit: fewer registers); addresses in int64
    bos = tl.load(cu + n).to(tl.int32)
    eos = tl.load(cu + n + 1).to(tl.int32)
    slot0 = tl.load(chunk_off + n).to(tl.int64)
    nc = (eos - bos + C - 1) // C
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    kk = kt * BK + tl.arange(0, BK)
    vv = vt * BV + tl.arange(0, BV)
    kmask = kk < K
    vmask = vv < V
    smask = kmask[:, None] & vmask[None, :]
    soff = kk[:, None] * V + vv[None, :]
    if USE_DHT:
        dS = tl.load(dht + (n * H + hh) * K * V + soff, mask=smask, other=0.).to(tl.float32)
    else:
        dS = tl.zeros((BK, BV), dtype=tl.float32)
    for i in range(0, nc):
        c = nc - 1 - i
        t0 = bos + c * C
        rmask = rows < eos - t0
        t0 = t0.to(tl.int64)
        if STORE_DH:
            tl.store(dh + ((slot0 + c) * H + hh) * K * V + soff, dS.to(dh.dtype.element_ty), mask=smask)
        ok = (t0 * H + hh) * K
        rk = rows * (H * K)
        ov = (t0 * H + hh) * V
        rv = rows * (H * V)
        mk = rmask[:, None] & kmask[None, :]
        mv = rmask[:, None] & vmask[None, :]
        bq = tl.load(q + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
        bg = tl.load(g + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
        bdo = tl.load(do + ov + rv[:, None] + vv[None, :], mask=mv, other=0.)
        b = tl.cumsum(bg, axis=0)
        gam = _row(b, rows, C - 1)
        if FUSE_DV:
            bk = tl.load(k + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
            bA = tl.load(A + (t0 * H + hh) * C + (rows * (H * C))[:, None] + cols[None, :],
                         mask=rmask[:, None], other=0.)
            kd = (bk * tl.exp(gam[None, :] - b)).to(DT)
            bdv = _mm(tl.trans(bA.to(DT)), bdo, IEEE) + _mm(kd, dS.to(DT), IEEE)
            tl.store(dv + ov + rv[:, None] + vv[None, :], bdv.to(dv.dtype.element_ty), mask=mv)
        qs = (bq * tl.exp(b) * scale).to(DT)
        dS = dS * tl.exp(gam)[:, None] + _mm(tl.trans(qs), bdo, IEEE)
    if STORE_DH0:
        tl.store(dh0 + (n * H + hh) * K * V + soff, dS, mask=smask)


@triton.jit
def _dv_kernel(k, g, do, A, dv, dh, cu, chunk_seq, chunk_off, N, H, K, V,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    NVT = tl.cdiv(V, BV)
    slot = (tl.program_id(0) // NVT).to(tl.int64)
    vt = tl.program_id(0) % NVT
    hh = tl.program_id(1).to(tl.int64)
    n, t0, nrow, _ = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    DT = k.dtype.element_ty
    if IEEE:
        DT = tl.float32
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    vv = vt * BV + tl.arange(0, BV)
    vmask = vv < V
    ov = (t0 * H + hh) * V
    rv = rows * (H * V)
    mv = rmask[:, None] & vmask[None, :]
    bdo = tl.load(do + ov + rv[:, None] + vv[None, :], mask=mv, other=0.)
    bA = tl.load(A + (t0 * H + hh) * C + (rows * (H * C))[:, None] + cols[None, :], mask=rmask[:, None], other=0.)
    acc = _mm(tl.trans(bA.to(DT)), bdo, IEEE)
    ok = (t0 * H + hh) * K
    rk = rows * (H * K)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        mk = rmask[:, None] & kmask[None, :]
        bk = tl.load(k + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
        bg = tl.load(g + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
        b = tl.cumsum(bg, axis=0)
        gam = _row(b, rows, C - 1)
        bdh = tl.load(dh + (slot * H + hh) * K * V + kk[:, None] * V + vv[None, :],
                      mask=kmask[:, None] & vmask[None, :], other=0.)
        acc += _mm((bk * tl.exp(gam[None, :] - b)).to(DT), bdh.to(DT), IEEE)
    tl.store(dv + ov + rv[:, None] + vv[None, :], acc.to(dv.dtype.element_ty), mask=mv)


@triton.jit
def _dqk_kernel(q, k, v, g, do, h, dh, dq, dk, dg, cu, chunk_seq, chunk_off, scale,
                N, H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                IEEE: tl.constexpr):
    NKT = tl.cdiv(K, BK)
    slot = (tl.program_id(0) // NKT).to(tl.int64)
    kt = tl.program_id(0) % NKT
    hh = tl.program_id(1).to(tl.int64)
    n, t0, nrow, _ = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    DT = q.dtype.element_ty
    if IEEE:
        DT = tl.float32
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    kk = kt * BK + tl.arange(0, BK)
    kmask = kk < K
    ok = (t0 * H + hh) * K
    rk = rows * (H * K)
    ov = (t0 * H + hh) * V
    rv = rows * (H * V)
    mk = rmask[:, None] & kmask[None, :]
    bq = tl.load(q + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
    bk = tl.load(k + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
    bg = tl.load(g + ok + rk[:, None] + kk[None, :], mask=mk, other=0.).to(tl.float32)
    b = tl.cumsum(bg, axis=0)
    gam = _row(b, rows, C - 1)

    dA = tl.zeros((C, C), dtype=tl.float32)
    dq_s = tl.zeros((C, BK), dtype=tl.float32)
    dk_s = tl.zeros((C, BK), dtype=tl.float32)
    dgh = tl.zeros((BK,), dtype=tl.float32)
    hbase = (slot * H + hh) * K * V
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        vmask = vv < V
        mv = rmask[:, None] & vmask[None, :]
        smask = kmask[:, None] & vmask[None, :]
        soff = kk[:, None] * V + vv[None, :]
        bdo = tl.load(do + ov + rv[:, None] + vv[None, :], mask=mv, other=0.)
        bv = tl.load(v + ov + rv[:, None] + vv[None, :], mask=mv, other=0.)
        bh = tl.load(h + hbase + soff, mask=smask, other=0.)
        bdh = tl.load(dh + hbase + soff, mask=smask, other=0.)
        dA += _mm(bdo, tl.trans(bv), IEEE)
        dq_s += _mm(bdo, tl.trans(bh.to(DT)), IEEE)
        dk_s += _mm(bv, tl.trans(bdh.to(DT)), IEEE)
        dgh += tl.sum(bh.to(tl.float32) * bdh.to(tl.float32), axis=1)
    dA = tl.where(rows[:, None] >= cols[None, :], dA * scale, 0.)

    # inter-chunk parts
    bdq = dq_s * scale * tl.exp(b)
    bdk_inter = dk_s * tl.exp(gam[None, :] - b)
    bdk = tl.zeros((C, BK), dtype=tl.float32)

    # dq intra, off-diagonal sub-blocks (reference: first row of the row sub-block)
    for i in tl.static_range(1, C // 16):
        br = _row(b, rows, 16 * i)
        inb = (rows // 16) == i
        before = rows < 16 * i
        kt_ = tl.where(before[:, None], bk * tl.exp(tl.where(before[:, None], br[None, :] - b, 0.)), 0.)
        dAi = tl.where(inb[:, None] & (cols[None, :] < 16 * i), dA, 0.)
        m = _mm(dAi.to(DT), kt_.to(DT), IEEE)
        bdq += tl.where(inb[:, None], tl.exp(tl.where(inb[:, None], b - br[None, :], 0.)) * m, 0.)
    # dk intra, off-diagonal sub-blocks (reference: last row of the column sub-block)
    for j in tl.static_range(0, C // 16 - 1):
        br = _row(b, rows, 16 * j + 15)
        after = rows >= 16 * (j + 1)
        inj = (rows // 16) == j
        qt_ = tl.where(after[:, None], bq * tl.exp(tl.where(after[:, None], b - br[None, :], 0.)), 0.)
        dAj = tl.where(after[:, None] & ((cols // 16) == j)[None, :], dA, 0.)
        m = _mm(tl.trans(dAj.to(DT)), qt_.to(DT), IEEE)
        bdk += tl.where(inj[:, None], tl.exp(tl.where(inj[:, None], br[None, :] - b, 0.)) * m, 0.)
    # diagonal sub-blocks, element-wise in float32.  The s == t terms are added after dg:
    # they cancel exactly in q*dq - k*dk, and leaving them out avoids float32 cancellation.
    for cc in range(16):
        # dq: column s = base(t) + cc < t
        srow = (rows // 16) * 16 + cc
        valid = (rows % 16) > cc
        ks = tl.load(k + (t0 * H + hh) * K + (srow * (H * K))[:, None] + kk[None, :],
                     mask=(srow < nrow)[:, None] & kmask[None, :], other=0.).to(tl.float32)
        bsel = _bcast_row(b, cc, C, BK)
        coef = tl.sum(tl.where(cols[None, :] == srow[:, None], dA, 0.), axis=1)
        bdq += tl.where(valid[:, None], coef[:, None] * ks * tl.exp(tl.where(valid[:, None], b - bsel, 0.)), 0.)
        # dk: row t = base(s) + cc >= s  (rows index s here)
        trow = srow
        tvalid = cc > (rows % 16)
        qs = tl.load(q + (t0 * H + hh) * K + (trow * (H * K))[:, None] + kk[None, :],
                     mask=(trow < nrow)[:, None] & kmask[None, :], other=0.).to(tl.float32)
        trow_c = (cols // 16) * 16 + cc
        coef_k = tl.sum(tl.where(rows[:, None] == trow_c[None, :], dA, 0.), axis=0)
        bdk += tl.where(tvalid[:, None], coef_k[:, None] * qs * tl.exp(tl.where(tvalid[:, None], bsel - b, 0.)), 0.)

    # dg_t = sum_{u >= t} (q dq - k dk_intra)_u + sum_{s < t} (k dk_inter)_s
    #        + exp(Gamma) * rowsum(S_in * dS_end)
    # (rowsum(S_end * dS_end) expanded, so that no O(1) terms cancel when gates are strong).
    x = bq * bdq - bk * bdk
    y = bk * bdk_inter
    # Both sums as float32 triangular products: a difference of cumulative sums would
    # lose small entries next to large ones.
    upper = (cols[None, :] >= rows[:, None]).to(tl.float32)
    lower = (cols[None, :] < rows[:, None]).to(tl.float32)
    bdg = (tl.dot(upper, x, input_precision="ieee") + tl.dot(lower, y, input_precision="ieee")
           + (tl.exp(gam) * dgh)[None, :])
    a_tt = tl.sum(tl.where(rows[:, None] == cols[None, :], dA, 0.), axis=1)
    bdq += a_tt[:, None] * bk
    bdk += a_tt[:, None] * bq + bdk_inter
    p = rk[:, None] + kk[None, :]
    tl.store(dq + ok + p, bdq.to(dq.dtype.element_ty), mask=mk)
    tl.store(dk + ok + p, bdk.to(dk.dtype.element_ty), mask=mk)
    tl.store(dg + ok + p, bdg.to(dg.dtype.element_ty), mask=mk)


# ----------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------

class _Meta:
    """Sequence/chunk bookkeeping built on the device from shapes only."""

    def __init__(self, q, cu_seqlens, C=C_CHUNK):
        B, T = q.shape[0], q.shape[1]
        dev = q.device
        if cu_seqlens is None:
            N = B
            NT = triton.cdiv(T, C)
            self.cu = torch.arange(0, B + 1, device=dev, dtype=torch.int64) * T
            self.chunk_off = torch.arange(0, B + 1, device=dev, dtype=torch.int64) * NT
            NC = B * NT
        else:
            N = cu_seqlens.numel() - 1
            self.cu = cu_seqlens.to(torch.int64)
            lens = self.cu[1:] - self.cu[:-1]
            nch = torch.div(lens + (C - 1), C, rounding_mode="floor")
            self.chunk_off = torch.cat([self.cu.new_zeros(1), torch.cumsum(nch, 0)])
            NC = T // C + N
        slots = torch.arange(NC, device=dev, dtype=torch.int64)
        self.chunk_seq = torch.searchsorted(self.chunk_off[1:].contiguous(), slots, right=True)
        self.N, self.NC = N, NC


def _state_dtype(dtype):
    """Storage of the per-chunk states of the backward: bf16 for bf16 inputs (their
    products are rounded to bf16 anyway), float32 otherwise (fp16 could overflow)."""
    return torch.bfloat16 if dtype == torch.bfloat16 and not _interpreting() else torch.float32


# Launch parameters per kernel; benchmarks may override entries (e.g. TUNE["fwd"] = {...}).
TUNE: dict = {}


def _cfg(K, V):
    """Tile sizes and launch options, chosen from the shape (no autotuning: the first
    call costs one compilation per kernel)."""
    interp = _interpreting()
    kp, vp = _np2(K), _np2(V)
    big = kp > 128
    # Defaults picked from ptxas register/spill reports for sm_90 (no autotuning).
    c = {
        # fused forward / forward state walk: one K tile while K <= 128
        "fwd": dict(BK=64 if big else kp, BV=min(vp, 32), num_warps=8,
                    num_stages=2),
        # state walk that stores the state entering every chunk (backward; forward K > 128)
        "hstate": dict(BK=min(kp, 64), BV=min(vp, 64), num_warps=8, num_stages=2),
        "A": dict(BK=min(kp, 64), num_warps=8, num_stages=2),
        "out": dict(BK=64, BV=min(vp, 64), num_warps=8, num_stages=2),
        "bstate": dict(BK=64 if big else kp, BV=min(vp, 64 if big else 32), num_warps=8,
                       num_stages=2),
        "dv": dict(BK=64, BV=min(vp, 64), num_warps=8, num_stages=2),
        "dqk": dict(BK=min(kp, 32), BV=min(vp, 64), num_warps=8, num_stages=2),
    }
    for key, over in TUNE.items():
        c[key] = {**c[key], **over}
    if interp:
        for v in c.values():
            v["num_warps"], v["num_stages"] = 4, 1
    return c


def _launch(c):
    return dict(num_warps=c["num_warps"], num_stages=c["num_stages"])


def _intra_A(q, k, g, scale, meta, IEEE, cfg):
    B, T, H, K = q.shape
    C = C_CHUNK
    A = torch.empty(B * T, H, C, device=q.device, dtype=torch.float32)
    if meta.NC > 0:
        c = cfg["A"]
        _intra_A_kernel[(meta.NC, H)](q, k, g, A, meta.cu, meta.chunk_seq, meta.chunk_off, scale,
                                      meta.N, H, K, C=C, BK=c["BK"], IEEE=IEEE, **_launch(c))
    return A


def _state_walk(q, k, v, g, A, o, h, h0, ht, meta, scale, IEEE, c, fuse_o, store_ht):
    B, T, H, K = q.shape
    V = v.shape[-1]
    NK, NV = triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"])
    _state_fwd_kernel[(meta.N * H * NK * NV,)](
        q, k, v, g, A, o, h, h0 if h0 is not None else q, ht, meta.cu, meta.chunk_off, scale,
        meta.N, H, K, V, C=C_CHUNK, BK=c["BK"], BV=c["BV"], NV=NV, FUSE_O=fuse_o,
        STORE_H=not fuse_o, USE_H0=h0 is not None, STORE_HT=store_ht, IEEE=IEEE, **_launch(c))


def chunk_fwd(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    IEEE = _ieee(q.dtype)
    meta = _Meta(q, cu_seqlens)
    N = meta.N
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    if N == 0 or H == 0:
        return o, ht
    cfg = _cfg(K, V)
    A = _intra_A(q, k, g, scale, meta, IEEE, cfg)
    fuse = cfg["fwd"]["BK"] >= K
    hbuf = o
    if not fuse:
        hbuf = torch.empty(meta.NC, H, K, V, device=q.device, dtype=_state_dtype(q.dtype))
    _state_walk(q, k, v, g, A, o, hbuf, initial_state, ht if ht is not None else o, meta, scale,
                IEEE, cfg["fwd"] if fuse else cfg["hstate"], fuse, output_final_state)
    if not fuse and meta.NC > 0:
        c = cfg["out"]
        _out_kernel[(meta.NC * triton.cdiv(V, c["BV"]), H)](
            q, v, g, A, o, hbuf, meta.cu, meta.chunk_seq, meta.chunk_off, scale, N, H, K, V,
            C=C_CHUNK, BK=c["BK"], BV=c["BV"], IEEE=IEEE, **_launch(c))
    return o, ht


def chunk_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = C_CHUNK
    IEEE = _ieee(q.dtype)
    meta = _Meta(q, cu_seqlens)
    N = meta.N
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dg = torch.empty_like(g)
    dh0 = torch.empty_like(initial_state) if initial_state is not None else None
    if N == 0 or H == 0:
        return dq, dk, dv, dg, dh0
    if meta.NC == 0:  # every sequence is empty: only the state gradient passes through
        if dh0 is not None:
            dh0.copy_(dht if dht is not None else torch.zeros_like(dh0))
        return dq, dk, dv, dg, dh0
    cfg = _cfg(K, V)
    A = _intra_A(q, k, g, scale, meta, IEEE, cfg)
    sdt = _state_dtype(q.dtype)
    # states entering every chunk (recomputed, never saved by the forward)
    h = torch.empty(meta.NC, H, K, V, device=q.device, dtype=sdt)
    _state_walk(q, k, v, g, A, q, h, initial_state, q, meta, scale, IEEE, cfg["hstate"], False, False)
    # gradient w.r.t. every chunk's final state; dv when one K tile covers K
    dhb = torch.empty(meta.NC, H, K, V, device=q.device, dtype=sdt)
    c = cfg["bstate"]
    NK, NV = triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"])
    fuse_dv = NK == 1
    _state_bwd_kernel[(N * H * NK * NV,)](
        q, k, g, do, A, dv, dhb, dht if dht is not None else q, dh0 if dh0 is not None else q,
        meta.cu, meta.chunk_off, scale, N, H, K, V, C=C, BK=c["BK"], BV=c["BV"], NV=NV,
        FUSE_DV=fuse_dv, STORE_DH=True, USE_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IEEE=IEEE, **_launch(c))
    if not fuse_dv:
        c = cfg["dv"]
        _dv_kernel[(meta.NC * triton.cdiv(V, c["BV"]), H)](
            k, g, do, A, dv, dhb, meta.cu, meta.chunk_seq, meta.chunk_off, N, H, K, V,
            C=C, BK=c["BK"], BV=c["BV"], IEEE=IEEE, **_launch(c))
    c = cfg["dqk"]
    _dqk_kernel[(meta.NC * triton.cdiv(K, c["BK"]), H)](
        q, k, v, g, do, h, dhb, dq, dk, dg, meta.cu, meta.chunk_seq, meta.chunk_off, scale,
        N, H, K, V, C=C, BK=c["BK"], BV=c["BV"], IEEE=IEEE, **_launch(c))
    return dq, dk, dv, dg, dh0
