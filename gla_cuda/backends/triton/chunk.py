"""Chunked GLA in Triton: forward and backward (docs/design.md, 'Semantics' and
'The chunked form and its numerics').

Layout: every tensor is viewed as packed tokens ``[B*T, H, D]``; a batch without
``cu_seqlens`` is the packed batch with boundaries ``0, T, 2T, ...``.  Time is cut
into chunks of ``C = 64`` tokens per sequence; a chunk "slot" is the chunk's index
in the packed list of all chunks of all sequences.  The map slot -> sequence is
built on the device (``searchsorted`` over the cumulative chunk counts), so the
grids are sized from shapes only (``<= cdiv(T, C) + N`` slots) and nothing ever
synchronises with the host; surplus programs find no rows and store nothing.  The slots
and the intermediates a training forward keeps for the backward are
gla_cuda.intermediates' layout.

Structure: only the state recurrences are serial, and they are kept light (loads and
one MMA per chunk: the gates are applied before them); all other work runs in programs
over (chunk, head, tile), fully parallel.

Kernels
-------
``_A_kernel``     per (slot, head): the scaled intra-chunk scores ``A``, stored in the
                  dtype the ``A v`` product rounds them to (the input dtype; float32
                  for float32 inputs), and the flag ``exact[slot, head]`` (below).
                  From the same loads, the gated operands ``kd = k exp(Gamma - b)`` and
                  ``qx = q exp(b)`` (forward) and/or ``scale q exp(b - b_0)`` (backward)
                  and the per-chunk decays ``exp(Gamma)`` (backward also
                  ``exp(Gamma - b_0)``, ``exp(b_0)``), so that no walk or light product
                  scans the gates.  Run by the forward and again by the backward, unless
                  the forward kept the backward's set with the states (training:
                  chunk_fwd_saving).
``_h_kernel``     per (sequence, head, K tile, V tile): walks the chunks and stores
                  the state entering every chunk (``h``) and the final state.  Per
                  chunk it loads kd, v and the decay and does one MMA.
``_dh_kernel``    per (sequence, head, K tile, V tile): the reverse walk of the state
                  gradient; stores the gradient w.r.t. every chunk's final state
                  (``dh``) and ``dh0``.  Per chunk: qx, do, the decays and one MMA.
``_light_kernel`` per (slot, V tile, head): ``o = scale qx h + A v``, or (DV)
                  ``dv = kd dh + A^T do``.
``_dA_kernel``    per (slot, head): ``dA = scale * tril(do v^T)`` (float32).
``_dqk_kernel``   per (slot, K tile, head): ``dq``, ``dk`` and ``dg`` from dA, h, dh.

Intra-chunk scores ``A[t, s] = scale * sum_k q_tk k_sk exp(b_tk - b_sk)`` (s <= t),
b the in-chunk cumulative sum of g, and the intra parts of dq and dk take one of two
forms per (chunk, head):

* one reference row r (the middle row) for the whole chunk: ``exp(b_t - b_s) =
  exp(b_t - b_r) exp(b_r - b_s)``, so A is one product of the gated operands
  ``q exp(b - b_r)`` and ``k exp(b_r - b)`` (tf32; the intra dq and dk likewise).  The
  factors are not bounded by 1 but by ``exp(SPAN)``, so this is taken only where
  ``|b_t - b_r| <= SPAN`` in every channel: far from float32's range, and relative errors
  of products are the same at any scale.  Gates up to about 1.2 per step (on average
  over half a chunk) take it.
* otherwise ``_A_kernel`` flags the chunk and a second launch of each kernel (EXACT 1)
  redoes only the flagged chunks exactly with a binary hierarchy of reference rows: the
  pairs (t > s) whose highest differing index bit is L lie in the upper and lower halves
  of one 2^(L+1)-token block; with r the first row of the upper half, ``exp(b_t - b_s)
  = exp(b_t - b_r) exp(b_r - b_s)`` and both factors equal ``exp(-|b_x - b_r|)``
  (exponent <= 0).  So each level is one exponential tile and one masked MMA; the six
  levels (C = 64) plus the element-wise diagonal cover every pair.  Levels inside a
  16-token sub-block (L < 4) multiply float32 operands (tf32 on the GPU for 16-bit
  inputs; exact float32 for float32 inputs) as batched [4, 16, 16] products of the
  diagonal sub-blocks alone; levels 4 and 5 use the input dtype, as the off-diagonal
  sub-blocks of the paper's secondary chunking do.  The backward uses the same levels
  for the intra parts of dq and dk (as full [C, C] products: the batched form measured
  slower there).  The reference row's b reaches the other rows by a gather, a reshape,
  or (REF 2) directly as the sum of the gates in between, ``D @ g`` with D in {-1, 0, 1}
  (exact: 16-bit g on tensor cores, float32 accumulation); the choice per kernel is a
  launch parameter (``_cfg``).

The flagged launches cost one early-exiting pass over the grid when nothing is flagged.
With gates of -20 per step every chunk is flagged: the kernels then run the exact
hierarchy plus the first scores launch, whose result is discarded.

Speed (H100, bf16, triton 3.6; do_bench per launch), ms per kernel at
(8, 2048, 16, 128, 128): A with the gated operands 0.25 (forward; 0.33 in the backward, which
also stores exp(Gamma - b_0), exp(b_0); both launches), h 0.09, o 0.13, dh 0.10, dv 0.13, dA
0.07, dq/dk/dg 0.77 (both launches; 1.50 with the exact hierarchy for every chunk).

``dg`` is chunk-local (no sequence-long cumulative sum):
``dg_t = sum_{u >= t} (q dq - k dk_intra)_u + sum_{s < t} (k dk_inter)_s
+ exp(Gamma) rowsum(S_in * dS_end)`` over the chunk, which is
``sum_{u >= t} (q dq - k dk)_u + rowsum(S_end * dS_end)`` with the terms that cancel
exactly taken out (the s == u terms of the intra part, the in-chunk part of S_end).
Both sums are float32 scans (the exclusive one is the inclusive scan read one row up by
a gather, never a difference), so dg stays accurate for gates of -20 per step.

Every exponent is masked to be <= 0 before ``exp``, except those of the one-reference
form, which are bounded by SPAN; all accumulation is float32.

Gates are clamped at every load to GATE_MIN (the backends' gate rule,
gla_cuda/backends/__init__.py): -inf (a hard reset) enters the cumulative sums as
-128, whose exp is 0, so that no -inf - (-inf) is formed; a chunk with a reset after
its first row exceeds SPAN and takes the exact path.  dg is stored as 0 where the gate
was clamped.
Token indices are int32 inside the kernels (B*T < 2**31), addresses int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gla_cuda.backends import GATE_MIN as _GATE_MIN
from gla_cuda.intermediates import C_CHUNK, ChunkSlots, operand_dtype, saved_like, state_dtype

GATE_MIN = tl.constexpr(_GATE_MIN)
# Largest |b_t - b_r| (natural log units, b the in-chunk cumulative gate, r the middle row)
# for which a chunk takes the single-reference path: operands scaled by up to exp(40)
# = 2e17 stay far from float32's range (3e38, and 1e-38 for the reciprocal side)
SPAN = 40.0
LOG2_C = tl.constexpr(6)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ieee(dtype) -> bool:
    """float32 dots (operands not rounded) wherever the scores and gated operands are stored
    in float32 (gla_cuda.intermediates.operand_dtype: float32 inputs, and bfloat16 in the
    interpreter, whose dot cannot multiply bfloat16 operands)."""
    return operand_dtype(dtype) == torch.float32


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
def _mm_lvl(a, b, L: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, TF: tl.constexpr):
    """Product of one level of the intra-chunk hierarchy (float32 operands a, b):
    exact float32 (IEEE), tf32 for levels below TF (4: inside 16-token sub-blocks),
    else the input dtype."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    elif L < TF:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _row(x, rows, r):
    """x[r, :] of a register tile as a vector (r is a scalar)."""
    return tl.sum(tl.where((rows == r)[:, None], x, 0.0), axis=0)


@triton.jit
def _level_exp(b, graw, L: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, REF: tl.constexpr,
               IEEE: tl.constexpr):
    """E[t, :] = exp(-|b[t, :] - b[r(t), :]|), r(t) the first row of the upper half of
    t's 2^(L+1)-row block: exp(b_t - b_r) for t >= r, exp(b_r - b_t) for t < r.
    REF picks how row r reaches row t: 0 gather, 1 reshape and masked sum, 2 the sum of
    the gates between t and r as one product D @ g (D in {-1, 0, 1}; exact for 16-bit g,
    and under IEEE; float32 g on tensor cores falls back to 1)."""
    W: tl.constexpr = 2 << L
    if REF == 2 and (IEEE or graw.dtype != tl.float32):
        t = tl.arange(0, C)
        r = (t // W) * W + W // 2
        up = (t[None, :] > r[:, None]) & (t[None, :] <= t[:, None])
        dn = (t[None, :] > t[:, None]) & (t[None, :] <= r[:, None])
        dmat = tl.where(up, 1.0, tl.where(dn, -1.0, 0.0))
        if IEEE:
            d = tl.dot(dmat, graw.to(tl.float32), input_precision="ieee")
        else:
            d = tl.dot(dmat.to(graw.dtype), graw)
        e = tl.exp(-tl.abs(d))
    elif REF == 0:
        ridx = (tl.arange(0, C) // W) * W + W // 2
        ref = tl.gather(b, tl.broadcast_to(ridx[:, None], (C, BK)), axis=0)
        e = tl.exp(-tl.abs(b - ref))
    else:
        b3 = tl.reshape(b, (C // W, W, BK))
        j = tl.arange(0, W)
        ref3 = tl.sum(tl.where((j == (W // 2))[None, :, None], b3, 0.0), axis=1)
        e = tl.reshape(tl.exp(-tl.abs(b3 - ref3[:, None, :])), (C, BK))
    return e


@triton.jit
def _level_mask(rows, cols, L: tl.constexpr):
    """Pairs t > s whose highest differing index bit is L."""
    x = rows[:, None] ^ cols[None, :]
    return ((x >> L) == 1) & (rows[:, None] > cols[None, :])


@triton.jit
def _intra_scores(bq, bk, b, graw, rows, cols, C: tl.constexpr, BK: tl.constexpr,
                      DT: tl.constexpr, IEEE: tl.constexpr, REF: tl.constexpr, TF: tl.constexpr):
    """sum_k q_tk k_sk exp(b_tk - b_sk) for s <= t, one K tile, split by 16-token
    sub-blocks: the pairs in different sub-blocks (levels 4 and 5) as a [C, C] tile (0 in
    and above the diagonal sub-blocks), the diagonal sub-blocks (levels 0-3 and t == s) as
    [C // 16, 16, 16] from batched products: a quarter of the MMA work of [C, C] products
    (0.27 ms instead of 0.43 at (8, 2048, 16, 128, 128) on the H100)."""
    S: tl.constexpr = 16
    NS: tl.constexpr = C // S
    acc = tl.zeros((C, C), dtype=tl.float32)
    for L in tl.static_range(4, LOG2_C):
        e = _level_exp(b, graw, L, C, BK, REF, IEEE)
        d = _mm_lvl(bq * e, tl.trans(bk * e), L, DT, IEEE, TF)
        acc += tl.where(_level_mask(rows, cols, L), d, 0.0)
    a = tl.arange(0, S)
    q3 = tl.reshape(bq, (NS, S, BK))
    k3 = tl.reshape(bk, (NS, S, BK))
    acc3 = tl.where((a[:, None] == a[None, :])[None, :, :], tl.sum(q3 * k3, axis=2)[:, :, None], 0.0)
    for L in tl.static_range(0, 4):
        e3 = tl.reshape(_level_exp(b, graw, L, C, BK, REF, IEEE), (NS, S, BK))
        d3 = _mm_lvl(q3 * e3, tl.permute(k3 * e3, (0, 2, 1)), L, DT, IEEE, TF)
        acc3 += tl.where(_level_mask(a, a, L)[None, :, :], d3, 0.0)
    return acc, acc3


@triton.jit
def _slot_info(chunk_seq, chunk_off, cu, slot, N, C: tl.constexpr):
    """(sequence n, first token t0, rows of this chunk that exist)."""
    n = tl.load(chunk_seq + slot)
    ok = n < N
    n = tl.minimum(n, N - 1)
    bos = tl.load(cu + n).to(tl.int32)
    eos = tl.load(cu + n + 1).to(tl.int32)
    c = (slot - tl.load(chunk_off + n)).to(tl.int32)
    t0 = bos + c * C
    nrow = tl.where(ok, eos - t0, 0)
    return n, t0.to(tl.int64), nrow


# ----------------------------------------------------------------------------
# Serial state walks (light: loads and one MMA per chunk)
# ----------------------------------------------------------------------------

@triton.jit
def _h_kernel(kd, v, vec, h, h0, ht, cu, chunk_off, N, H, K, V,
              C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
              USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IEEE: tl.constexpr):
    # program id -> (sequence, head, K tile, V tile); the tiles of one (sequence, head)
    # are neighbours, so they run together and share kd/v through L2.  The gates were
    # applied by _A_kernel (kd = k exp(Gamma - b), vec[.., 0, :] = exp(Gamma)): the
    # serial loop is loads and one MMA per chunk.
    NT = tl.cdiv(K, BK) * NV
    pid = tl.program_id(0)
    tile = pid % NT
    n = (pid // NT // H).to(tl.int64)
    hh = (pid // NT % H).to(tl.int64)
    kt = tile // NV
    vt = tile % NV
    bos = tl.load(cu + n).to(tl.int32)
    eos = tl.load(cu + n + 1).to(tl.int32)
    slot0 = tl.load(chunk_off + n).to(tl.int64)
    nc = (eos - bos + C - 1) // C
    rows = tl.arange(0, C)
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
        sh = (slot0 + c) * H + hh
        tl.store(h + sh * K * V + soff, S.to(h.dtype.element_ty), mask=smask)
        bk = tl.load(kd + (t0 * H + hh) * K + (rows * (H * K))[:, None] + kk[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.)
        bv = tl.load(v + (t0 * H + hh) * V + ((rows * (H * V))[:, None] + vv[None, :]),
                     mask=rmask[:, None] & vmask[None, :], other=0.)
        eg = tl.load(vec + sh * 3 * K + kk, mask=kmask, other=0.)
        S = S * eg[:, None] + _mm(tl.trans(bk), bv, IEEE)
    if STORE_HT:
        tl.store(ht + (n * H + hh) * K * V + soff, S, mask=smask)


@triton.jit
def _dh_kernel(qx, do, vec, dh, dht, dh0, cu, chunk_off, N, H, K, V,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
               USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IEEE: tl.constexpr):
    # qx = scale q exp(b - b_0) and vec[.., 1:3, :] = exp(Gamma - b_0), exp(b_0) from
    # _A_kernel: exp(b) relative to the chunk's first row, exp(b_0) applied in float32
    # after the product: rounded to float16, a factor like exp(-20) would be flushed to
    # zero, and with strong gates it is all there is of dh0 (every factor is <= 1)
    NT = tl.cdiv(K, BK) * NV
    pid = tl.program_id(0)
    tile = pid % NT
    n = (pid // NT // H).to(tl.int64)
    hh = (pid // NT % H).to(tl.int64)
    kt = tile // NV
    vt = tile % NV
    bos = tl.load(cu + n).to(tl.int32)
    eos = tl.load(cu + n + 1).to(tl.int32)
    slot0 = tl.load(chunk_off + n).to(tl.int64)
    nc = (eos - bos + C - 1) // C
    rows = tl.arange(0, C)
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
        sh = (slot0 + c) * H + hh
        tl.store(dh + sh * K * V + soff, dS.to(dh.dtype.element_ty), mask=smask)
        bq = tl.load(qx + (t0 * H + hh) * K + (rows * (H * K))[:, None] + kk[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.)
        bdo = tl.load(do + (t0 * H + hh) * V + ((rows * (H * V))[:, None] + vv[None, :]),
                      mask=rmask[:, None] & vmask[None, :], other=0.)
        e1 = tl.load(vec + sh * 3 * K + K + kk, mask=kmask, other=0.)
        e0 = tl.load(vec + sh * 3 * K + 2 * K + kk, mask=kmask, other=0.)
        dS = (dS * e1[:, None] + _mm(tl.trans(bq), bdo, IEEE)) * e0[:, None]
    if STORE_DH0:
        tl.store(dh0 + (n * H + hh) * K * V + soff, dS, mask=smask)


# ----------------------------------------------------------------------------
# Parallel kernels over chunks
# ----------------------------------------------------------------------------

@triton.jit
def _gated_store(bq, bk, b, g0, rows, qx, qxb, kd, p, m, kk, vrow, nrow, scale, K,
                 C: tl.constexpr, FWD: tl.constexpr, BWD: tl.constexpr):
    """The gated operands of one K tile, so that no state walk or light product scans the
    gates: kd = k exp(Gamma - b); with FWD qx = q exp(b) (o); with BWD qxb = scale q
    exp(b - b_0) (dh); vec[slot, head] = exp(Gamma), with BWD also exp(Gamma - b_0),
    exp(b_0) (per channel, float32; vrow points at the slot's row; g0 = b_0, the first
    row's gates)."""
    gam = _row(b, rows, C - 1)
    tl.store(kd + p, (bk * tl.exp(tl.minimum(gam[None, :] - b, 0.))).to(kd.dtype.element_ty), mask=m)
    vm = (kk < K) & (nrow > 0)
    tl.store(vrow + kk, tl.exp(gam), mask=vm)
    if BWD:
        b0 = g0.to(tl.float32)
        tl.store(qxb + p, (bq * tl.exp(tl.minimum(b - b0[None, :], 0.)) * scale).to(qxb.dtype.element_ty), mask=m)
        tl.store(vrow + K + kk, tl.exp(gam - b0), mask=vm)
        tl.store(vrow + 2 * K + kk, tl.exp(b0), mask=vm)
    if FWD:
        tl.store(qx + p, (bq * tl.exp(b)).to(qx.dtype.element_ty), mask=m)


@triton.jit
def _gate(x):
    """A gate tile as loaded, clamped to GATE_MIN, back in its own dtype (GATE_MIN is exact
    in every gate dtype; NaN stays NaN)."""
    xf = x.to(tl.float32)
    return tl.where(xf < GATE_MIN, GATE_MIN, xf).to(x.dtype)


@triton.jit
def _qkg_tile(q, k, g, base, roff, rmask, k0, K, BK: tl.constexpr):
    """Rows of one chunk, channels k0 .. k0 + BK: q and k in float32, g as stored, and
    the tile's offsets, mask and channels."""
    kk = k0 + tl.arange(0, BK)
    m = rmask[:, None] & (kk < K)[None, :]
    p = base + roff[:, None] + kk[None, :]
    bq = tl.load(q + p, mask=m, other=0.).to(tl.float32)
    bk = tl.load(k + p, mask=m, other=0.).to(tl.float32)
    return bq, bk, _gate(tl.load(g + p, mask=m, other=0.)), p, m, kk


@triton.jit
def _A_kernel(q, k, g, A, exact, qx, qxb, kd, vec, cu, chunk_seq, chunk_off, scale, N, H, K,
              C: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, REF: tl.constexpr,
              TF: tl.constexpr, SPAN: tl.constexpr, EXACT: tl.constexpr, FWD: tl.constexpr,
              BWD: tl.constexpr):
    """Per (slot, head): the scaled intra-chunk scores A.
    EXACT 0: with the middle row r as the one reference of the chunk, A = (q exp(b - b_r))
    (k exp(b_r - b))^T, one tf32 product per K tile; a chunk with |b_t - b_r| > SPAN in
    some channel (gates too strong for it) is flagged in exact[slot, head] instead.  Every
    chunk's gated operands (_gated_store) are written on the way, from the same loads.
    EXACT 1: only the flagged chunks, by the hierarchy of reference rows."""
    slot = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    n, t0, nrow = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    DT = q.dtype.element_ty
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    base = (t0 * H + hh) * K
    roff = rows * (H * K)
    A += (t0 * H + hh) * C
    pa = A + (rows * (H * C))[:, None] + cols[None, :]
    if EXACT == 0:
        acc = tl.zeros((C, C), dtype=tl.float32)
        span = 0.
        vrow = vec + (slot * H + hh) * 3 * K
        for k0 in range(0, K, BK):
            bq, bk, graw, p, m, kk = _qkg_tile(q, k, g, base, roff, rmask, k0, K, BK)
            b = tl.cumsum(graw.to(tl.float32), axis=0)
            g0 = _gate(tl.load(g + base + kk, mask=(kk < K) & (nrow > 0), other=0.))
            _gated_store(bq, bk, b, g0, rows, qx, qxb, kd, p, m, kk, vrow, nrow, scale, K, C,
                         FWD, BWD)
            d = b - _row(b, rows, C // 2)[None, :]
            span = tl.maximum(span, tl.max(tl.abs(d)))
            d = tl.minimum(tl.maximum(d, -SPAN), SPAN)  # finite even where flagged
            acc += _mm_lvl(bq * tl.exp(d), tl.trans(bk * tl.exp(-d)), 0, DT, IEEE, TF)
        tl.store(exact + slot * H + hh, (span > SPAN).to(tl.int8))
        if span <= SPAN:
            acc = tl.where(rows[:, None] >= cols[None, :], acc, 0.) * scale
            tl.store(pa, acc.to(A.dtype.element_ty), mask=rmask[:, None])
    elif tl.load(exact + slot * H + hh) != 0:
        acc = tl.zeros((C, C), dtype=tl.float32)
        acc3 = tl.zeros((C // 16, 16, 16), dtype=tl.float32)
        for k0 in range(0, K, BK):
            bq, bk, graw, _, _, _ = _qkg_tile(q, k, g, base, roff, rmask, k0, K, BK)
            b = tl.cumsum(graw.to(tl.float32), axis=0)
            off, d3 = _intra_scores(bq, bk, b, graw, rows, cols, C, BK, DT, IEEE, REF, TF)
            acc += off
            acc3 += d3
        # the off-diagonal sub-blocks from acc, the diagonal ones from acc3
        tl.store(pa, (acc * scale).to(A.dtype.element_ty),
                 mask=rmask[:, None] & ((rows // 16)[:, None] != (cols // 16)[None, :]))
        i3 = tl.arange(0, C // 16)[:, None, None]
        r3 = i3 * 16 + tl.arange(0, 16)[None, :, None]
        tl.store(A + r3 * (H * C) + i3 * 16 + tl.arange(0, 16)[None, None, :],
                 (acc3 * scale).to(A.dtype.element_ty), mask=r3 < nrow)


@triton.jit
def _dA_kernel(v, do, dA, cu, chunk_seq, chunk_off, scale, N, H, V,
               C: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """dA = scale * tril(do v^T) per (slot, head), float32."""
    slot = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    n, t0, nrow = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    v += (t0 * H + hh) * V
    do += (t0 * H + hh) * V
    rv = rows * (H * V)
    acc = tl.zeros((C, C), dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        m = rmask[:, None] & (vv < V)[None, :]
        p = rv[:, None] + vv[None, :]
        bdo = tl.load(do + p, mask=m, other=0.)
        bv = tl.load(v + p, mask=m, other=0.)
        acc += _mm(bdo, tl.trans(bv), IEEE)
    acc = tl.where(rows[:, None] >= cols[None, :], acc * scale, 0.)
    tl.store(dA + (t0 * H + hh) * C + (rows * (H * C))[:, None] + cols[None, :], acc,
             mask=rmask[:, None])


@triton.jit
def _light_kernel(x, y, A, out, s, cu, chunk_seq, chunk_off, scale, N, H, K, V,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
                  DV: tl.constexpr):
    """One (slot, V tile, head) of a light product of the gated operands and the scores A
    (both from _A_kernel):
    o  = scale (q exp(b)) h + A v          (x = qx, s = h, y = v), or with DV
    dv = (k exp(Gamma - b)) dh + A^T do    (x = kd, s = dh, y = do)."""
    NVT = tl.cdiv(V, BV)
    slot = (tl.program_id(0) // NVT).to(tl.int64)
    vt = tl.program_id(0) % NVT
    hh = tl.program_id(1).to(tl.int64)
    n, t0, nrow = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    DT = x.dtype.element_ty
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    vv = vt * BV + tl.arange(0, BV)
    vmask = vv < V
    # scalar 64-bit bases, 32-bit offset tiles
    x += (t0 * H + hh) * K
    s += (slot * H + hh) * K * V
    rk = rows * (H * K)
    hm = nrow > 0  # surplus slots (varlen) have no state: never read it
    acc = tl.zeros((C, BV), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        bx = tl.load(x + rk[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.)
        bs = tl.load(s + kk[:, None] * V + vv[None, :], mask=hm & kmask[:, None] & vmask[None, :], other=0.)
        acc += _mm(bx, bs.to(DT), IEEE)
    sA = tl.load(A + (t0 * H + hh) * C + (rows * (H * C))[:, None] + cols[None, :],
                 mask=rmask[:, None], other=0.)
    y += (t0 * H + hh) * V
    out += (t0 * H + hh) * V
    pv = (rows * (H * V))[:, None] + vv[None, :]
    mv = rmask[:, None] & vmask[None, :]
    by = tl.load(y + pv, mask=mv, other=0.)
    if DV:
        acc += _mm(tl.trans(sA.to(DT)), by, IEEE)
    else:
        acc = acc * scale + _mm(sA.to(DT), by, IEEE)
    tl.store(out + pv, acc.to(out.dtype.element_ty), mask=mv)


@triton.jit
def _dqk_kernel(q, k, v, g, do, dA, h, dh, dq, dk, dg, exact, cu, chunk_seq, chunk_off, scale,
                N, H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                IEEE: tl.constexpr, REF: tl.constexpr, TF: tl.constexpr, WIDE: tl.constexpr,
                EXACT: tl.constexpr):
    """dq, dk, dg of one chunk: EXACT 0 the chunks not flagged by _A_kernel (the intra
    parts with one reference row, one product each), EXACT 1 the flagged ones (the
    hierarchy).  WIDE (float16 inputs): products in tf32, not float16: dg is made of the
    off-diagonal terms alone, which strong gates scale by factors like exp(-20), below
    float16's range."""
    NKT = tl.cdiv(K, BK)
    slot = (tl.program_id(0) // NKT).to(tl.int64)
    kt = tl.program_id(0) % NKT
    hh = tl.program_id(1).to(tl.int64)
    if tl.load(exact + slot * H + hh).to(tl.int32) == EXACT:
        _dqk_chunk(q, k, v, g, do, dA, h, dh, dq, dk, dg, cu, chunk_seq, chunk_off, scale,
                   N, H, K, V, slot, kt, hh, C, BK, BV, IEEE, REF, TF, WIDE, EXACT)


@triton.jit
def _dqk_chunk(q, k, v, g, do, dA, h, dh, dq, dk, dg, cu, chunk_seq, chunk_off, scale,
               N, H, K, V, slot, kt, hh, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               IEEE: tl.constexpr, REF: tl.constexpr, TF: tl.constexpr, WIDE: tl.constexpr,
               EXACT: tl.constexpr):
    n, t0, nrow = _slot_info(chunk_seq, chunk_off, cu, slot, N, C)
    DT = q.dtype.element_ty
    DTL = q.dtype.element_ty
    if IEEE or WIDE:
        DT = tl.float32
    if WIDE:
        DTL = tl.float32
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    rmask = rows < nrow
    kk = kt * BK + tl.arange(0, BK)
    kmask = kk < K
    base_k = (t0 * H + hh) * K
    base_v = (t0 * H + hh) * V
    q += base_k
    k += base_k
    g += base_k
    dq += base_k
    dk += base_k
    dg += base_k
    v += base_v
    do += base_v
    h += (slot * H + hh) * K * V
    dh += (slot * H + hh) * K * V
    rk = rows * (H * K)
    rv = rows * (H * V)
    mk = rmask[:, None] & kmask[None, :]
    p = rk[:, None] + kk[None, :]

    # every load is issued before the inter-chunk products, so that their latencies
    # overlap (0.79 instead of 0.96 ms at (8, 2048, 16, 128, 128) on the H100): q, k, g,
    # dA strictly below the diagonal as a tile and its diagonal as a vector
    bq = tl.load(q + p, mask=mk, other=0.)
    bk = tl.load(k + p, mask=mk, other=0.)
    graw = _gate(tl.load(g + p, mask=mk, other=0.))
    dA += (t0 * H + hh) * C
    a_tt = tl.load(dA + rows * (H * C) + rows, mask=rmask, other=0.)
    dA = tl.load(dA + (rows * (H * C))[:, None] + cols[None, :],
                 mask=rmask[:, None] & (rows[:, None] > cols[None, :]), other=0.)

    # inter-chunk parts: do h^T, v dh^T and rowsum(h * dh) over V
    dq_s = tl.zeros((C, BK), dtype=tl.float32)
    dk_s = tl.zeros((C, BK), dtype=tl.float32)
    dgh = tl.zeros((BK,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        vmask = vv < V
        mv = rmask[:, None] & vmask[None, :]
        smask = (nrow > 0) & kmask[:, None] & vmask[None, :]
        soff = kk[:, None] * V + vv[None, :]
        pv = rv[:, None] + vv[None, :]
        bdo = tl.load(do + pv, mask=mv, other=0.)
        bv = tl.load(v + pv, mask=mv, other=0.)
        bh = tl.load(h + soff, mask=smask, other=0.)
        bdh = tl.load(dh + soff, mask=smask, other=0.)
        dq_s += _mm(bdo.to(DT), tl.trans(bh.to(DT)), IEEE)
        dk_s += _mm(bv.to(DT), tl.trans(bdh.to(DT)), IEEE)
        dgh += tl.sum(bh.to(tl.float32) * bdh.to(tl.float32), axis=1)
    bq = bq.to(tl.float32)
    bk = bk.to(tl.float32)
    b = tl.cumsum(graw.to(tl.float32), axis=0)
    gam = _row(b, rows, C - 1)

    bdq = dq_s * scale * tl.exp(b)
    bdk_inter = dk_s * tl.exp(tl.minimum(gam[None, :] - b, 0.))
    # exclusive prefix sum of k * dk_inter: the inclusive one, read one row up (exact: no
    # subtraction, which would cancel when strong gates make the last term dominate)
    cy = tl.cumsum(bk * bdk_inter, axis=0)
    sh = tl.maximum(rows - 1, 0)
    y_ex = tl.where((rows >= 1)[:, None],
                    tl.gather(cy, tl.broadcast_to(sh[:, None], (C, BK)), axis=0), 0.)

    # intra parts, off the diagonal: the hierarchy of reference rows (see the docstring)
    bdk = tl.zeros((C, BK), dtype=tl.float32)
    if EXACT:
        for L in tl.static_range(0, LOG2_C):
            e = _level_exp(b, graw, L, C, BK, REF, IEEE)
            dAl = tl.where(_level_mask(rows, cols, L), dA, 0.)
            bdq += e * _mm_lvl(dAl, bk * e, L, DTL, IEEE, TF)
            bdk += e * _mm_lvl(tl.trans(dAl), bq * e, L, DTL, IEEE, TF)
    else:
        # one reference row r (the middle one) for the chunk: the gated operands stay
        # within exp(+-SPAN) (_A_kernel checked), so one tf32 product each
        er = tl.exp(b - _row(b, rows, C // 2)[None, :])
        rr = 1. / er
        bdq += er * _mm_lvl(dA, bk * rr, 0, DTL, IEEE, TF)
        bdk += rr * _mm_lvl(tl.trans(dA), bq * er, 0, DTL, IEEE, TF)

    # dg_t = sum_{u >= t} (q dq - k dk_intra)_u + sum_{s < t} (k dk_inter)_s
    #        + exp(Gamma) * rowsum(S_in * dS_end)
    # (rowsum(S_end * dS_end) expanded, so that no O(1) terms cancel when gates are strong).
    # The diagonal (s == t) terms cancel exactly in q*dq - k*dk and are added afterwards.
    x = bq * bdq - bk * bdk
    bdg = tl.cumsum(x, axis=0, reverse=True) + y_ex + (tl.exp(gam) * dgh)[None, :]
    # a clamped gate's terms all carry its exp, 0: store the exact 0, not the rounding of
    # the sums' cancellation
    bdg = tl.where(graw.to(tl.float32) <= GATE_MIN, 0., bdg)
    bdq += a_tt[:, None] * bk
    bdk += a_tt[:, None] * bq + bdk_inter
    tl.store(dq + p, bdq.to(dq.dtype.element_ty), mask=mk)
    tl.store(dk + p, bdk.to(dk.dtype.element_ty), mask=mk)
    tl.store(dg + p, bdg.to(dg.dtype.element_ty), mask=mk)


# ----------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------

# Launch parameters per kernel; benchmarks may override entries (e.g. TUNE["o"] = {...}).
TUNE: dict = {}


def _cfg(K, V):
    """Tile sizes and launch options, chosen from the shape (no autotuning: the first
    call costs one compilation per kernel).

    Picked kernel by kernel from H100 sweeps (TUNE overrides timed with do_bench, bf16, the
    four shapes of docs/design.md, 'The roofline'; each value was the best or tied of
    its sweep, measured with the other kernels at their previous settings): the scores A (and the gated operands) in
    their own kernel (one reference row: K tiles of 64, 4 warps; forward+backward 0.02-0.07
    ms slower with K tiles of 32, 0.07-0.23 with 8 warps; the exact launch: K tiles of 16,
    2 warps, REF 2); o and dv as light products reading A (computing A inside them, in
    registers, was 0.2-0.5 ms slower); dq/dk/dg with K tiles of 32, V tiles of 128 and 4
    warps (one reference row: K tiles of 64 and 8 warps 0.14 ms slower, 8 warps or K tiles of
    16 0.3-0.4 ms slower, V tiles of 64 0.02-0.07 ms slower) and, for the
    exact launch, K tiles of 64 and 8 warps (K tiles of 32 or 4 warps: 0.5-1.7 ms slower;
    REF 2 or 1 there: 0.3-2 ms slower); the state walks (reading gated operands) with
    64 x 64 tiles and 4 warps (K tiles of 32 and 2 warps: 0.1 ms slower at K = 256).  TF 4
    keeps the levels inside 16-token sub-blocks in tf32 (docs/design.md, 'The chunked form
    and its numerics': float32 on the diagonal sub-blocks); the one-reference products are
    tf32 throughout."""
    interp = _interpreting()
    kp, vp = _np2(K), _np2(V)
    c = {
        "h": dict(BK=min(kp, 64), BV=min(vp, 64), num_warps=4, num_stages=3),
        "dh": dict(BK=min(kp, 64), BV=min(vp, 64), num_warps=4, num_stages=3),
        "A": dict(BK=min(kp, 64), TF=4, SPAN=SPAN, num_warps=4, num_stages=2),
        "A_exact": dict(BK=16, REF=2, TF=4, num_warps=2, num_stages=2),
        "o": dict(BK=min(kp, 64), BV=min(vp, 128), num_warps=4, num_stages=2),
        "dv": dict(BK=min(kp, 64), BV=min(vp, 128), num_warps=4, num_stages=2),
        "dA": dict(BV=min(vp, 64), num_warps=4, num_stages=2),
        "dqk": dict(BK=min(kp, 32), BV=min(vp, 128), TF=4, num_warps=4, num_stages=2),
        "dqk_exact": dict(BK=min(kp, 64), BV=min(vp, 64), REF=0, TF=4, num_warps=8,
                          num_stages=2),
    }
    for key, over in TUNE.items():
        c[key] = {**c[key], **over}
    if interp:
        for v in c.values():
            v["num_warps"], v["num_stages"] = 4, 1
    return c


def _launch(c):
    return dict(num_warps=c["num_warps"], num_stages=c["num_stages"])


def _states(kd, v, vec, h0, ht, meta, IEEE, c, dtype=None):
    """States entering every chunk (per slot; in dtype, default state_dtype), and the final
    states into ht."""
    B, T, H, K = kd.shape
    V = v.shape[-1]
    h = torch.empty(meta.NC, H, K, V, device=kd.device, dtype=dtype or state_dtype(v.dtype))
    NK, NV = triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"])
    _h_kernel[(meta.N * H * NK * NV,)](
        kd, v, vec, h, h0 if h0 is not None else kd, ht if ht is not None else kd, meta.cu,
        meta.chunk_off, meta.N, H, K, V, C=C_CHUNK, BK=c["BK"], BV=c["BV"], NV=NV,
        USE_H0=h0 is not None, STORE_HT=ht is not None, IEEE=IEEE, **_launch(c))
    return h


def _prep(q, k, g, scale, meta, IEEE, cfg, fwd, bwd):
    """The scores A, the exact flags and the gated operands (_A_kernel): kd, the decays
    vec, and qx for the forward's o (fwd) and/or qxb for the backward's dh walk (bwd)."""
    B, T, H, K = q.shape
    # scaled scores in the dtype the A @ v products round them to, gated operands in the
    # dtype their products take (float32 for float32 inputs and in the interpreter)
    dt = operand_dtype(q.dtype)
    A = torch.empty(B * T, H, C_CHUNK, device=q.device, dtype=dt)
    qx = torch.empty(q.shape, device=q.device, dtype=dt) if fwd else None
    qxb = torch.empty(q.shape, device=q.device, dtype=dt) if bwd else None
    kd = torch.empty(q.shape, device=q.device, dtype=dt)
    vec = torch.empty(meta.NC, H, 3, K, device=q.device, dtype=torch.float32)
    # the scores with one reference row per chunk (and the gated operands), then the chunks
    # flagged as too strongly gated for it (exact[slot, head] != 0) by the exact hierarchy
    exact = torch.empty(meta.NC, H, device=q.device, dtype=torch.int8)
    for key in ("A", "A_exact"):
        c = cfg[key]
        _A_kernel[(meta.NC, H)](q, k, g, A, exact, qx if fwd else qxb, qxb if bwd else qx, kd, vec,
                                meta.cu, meta.chunk_seq, meta.chunk_off, scale, meta.N, H, K,
                                C=C_CHUNK, BK=c["BK"], IEEE=IEEE, REF=c.get("REF", 0), TF=c["TF"],
                                SPAN=c.get("SPAN", SPAN), EXACT=int(key == "A_exact"), FWD=fwd,
                                BWD=bwd, **_launch(c))
    return A, exact, qx, qxb, kd, vec


def _forward(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, save, h_dtype=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    IEEE = _ieee(q.dtype)
    meta = ChunkSlots(q, cu_seqlens)
    N = meta.N
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    if N == 0 or H == 0 or meta.NC == 0:
        if ht is not None:  # every sequence is empty
            ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
        return o, ht, saved_like(q, k, v, g, cu_seqlens)
    cfg = _cfg(K, V)
    # saving: the backward's operand qxb too, from the same loads
    A, exact, qx, qxb, kd, vec = _prep(q, k, g, scale, meta, IEEE, cfg, fwd=True, bwd=save)
    h = _states(kd, v, vec, initial_state, ht, meta, IEEE, cfg["h"], h_dtype)
    c = cfg["o"]
    _light_kernel[(meta.NC * triton.cdiv(V, c["BV"]), H)](
        qx, v, A, o, h, meta.cu, meta.chunk_seq, meta.chunk_off, scale, N, H, K, V,
        C=C_CHUNK, BK=c["BK"], BV=c["BV"], IEEE=IEEE, DV=False, **_launch(c))
    return o, ht, (A, exact, qxb, kd, vec, h)


def chunk_fwd(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    o, ht, _ = _forward(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, save=False)
    return o, ht


def chunk_fwd_states(q, k, v, g, scale, initial_state, cu_seqlens):
    """chunk_fwd with the final states and the float32 state entering every chunk slot
    ([slots, H, K, V], slots as in saved_like; the serving prefill's checkpoints)."""
    o, ht, saved = _forward(q, k, v, g, scale, initial_state, True, cu_seqlens, save=False,
                            h_dtype=torch.float32)
    return o, ht, saved[5].float()


def chunk_fwd_saving(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """chunk_fwd for training: also returns what chunk_bwd would otherwise recompute
    (gla_cuda.intermediates' six tensors), so that the backward skips the scores and state launches."""
    return _forward(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, save=True)


def chunk_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, saved=None):
    """The gradients; saved: chunk_fwd_saving's intermediates (else recomputed here)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = C_CHUNK
    IEEE = _ieee(q.dtype)
    meta = ChunkSlots(q, cu_seqlens)
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
    # scores, gated operands and states entering every chunk
    if saved is not None:
        A, exact, qx, kd, vec, h = saved
    else:
        A, exact, _, qx, kd, vec = _prep(q, k, g, scale, meta, IEEE, cfg, fwd=False, bwd=True)
        h = _states(kd, v, vec, initial_state, None, meta, IEEE, cfg["h"])
    # gradient w.r.t. every chunk's final state
    dhb = torch.empty(meta.NC, H, K, V, device=q.device, dtype=h.dtype)
    c = cfg["dh"]
    NK, NV = triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"])
    _dh_kernel[(N * H * NK * NV,)](
        qx, do, vec, dhb, dht if dht is not None else q, dh0 if dh0 is not None else q,
        meta.cu, meta.chunk_off, N, H, K, V, C=C, BK=c["BK"], BV=c["BV"], NV=NV,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, IEEE=IEEE, **_launch(c))
    c = cfg["dv"]
    _light_kernel[(meta.NC * triton.cdiv(V, c["BV"]), H)](
        kd, do, A, dv, dhb, meta.cu, meta.chunk_seq, meta.chunk_off, scale, N, H, K, V,
        C=C, BK=c["BK"], BV=c["BV"], IEEE=IEEE, DV=True, **_launch(c))
    # scaled do v^T, lower triangle (float32)
    c = cfg["dA"]
    dA = torch.empty(B * T, H, C, device=q.device, dtype=torch.float32)
    _dA_kernel[(meta.NC, H)](v, do, dA, meta.cu, meta.chunk_seq, meta.chunk_off, scale, N, H, V,
                             C=C, BV=c["BV"], IEEE=IEEE, **_launch(c))
    for key in ("dqk", "dqk_exact"):
        c = cfg[key]
        _dqk_kernel[(meta.NC * triton.cdiv(K, c["BK"]), H)](
            q, k, v, g, do, dA, h, dhb, dq, dk, dg, exact, meta.cu, meta.chunk_seq, meta.chunk_off,
            scale, N, H, K, V, C=C, BK=c["BK"], BV=c["BV"], IEEE=IEEE, REF=c.get("REF", 0),
            TF=c["TF"], WIDE=q.dtype == torch.float16, EXACT=int(key == "dqk_exact"), **_launch(c))
    return dq, dk, dv, dg, dh0
