"""Fused swish-gated RMSNorm (the GLA layer's output norm), forward and backward.

Over the last dim D, in float32, output in x's dtype:

    r = rsqrt(mean(x^2) + eps),  xh = x * r,  y = xh * w * silu(gate)

(w = 1 without a weight, silu(gate) = 1 without a gate). One read of x and the gate
and one write of y, instead of ~9 separate PyTorch kernels with float32 temporaries.

Backward, with s = silu(g), sg = sigmoid(g), u = dy * s, dxh = u * w:

    dgate = dy * xh * w * sg * (1 + g * (1 - sg))
    dw    = sum over rows of u * xh
    dx    = r * (dxh - xh * mean(dxh * xh))

rstd is recomputed from x rather than saved: the backward reads x anyway.
The weight gradient is deterministic: a fixed grid of programs each walks a
contiguous range of rows, sums its share in float32 registers and writes one row
of a [programs, D] float32 buffer, summed afterwards in a fixed order. No atomics.

A program holds BLOCK_M whole rows (BLOCK_D = next power of two >= D, masked), so any
D up to MAX_D works; leading dims are flattened to rows with their row stride kept.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import NORM_MAX_D as MAX_D  # noqa: E402  (the coverage check lives in __init__)
# Elements of [BLOCK_M, BLOCK_D] a program holds (BLOCK_M = tile // BLOCK_D rows, tile // 1024
# warps) and backward programs per SM. Measured on an H100 at [8, 2048, 16, 128] bf16 with a
# bf16 gate (do_bench median): forward 0.074 ms at a 2048 tile (0.077 at 4096; the floor at
# 3.0 TB/s is 0.067), backward 0.141 ms at 16 programs per SM (0.160 at 8; floor 0.112).
_FWD_TILE = 2048
_BWD_TILE = 2048
_BWD_PROGRAMS_PER_SM = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device(x: torch.Tensor):
    # Triton launches on the current device, which need not be x's.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """[..., D] -> [M, D] with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _blocks(D: int, tile: int, block_m: Optional[int], num_warps: Optional[int]):
    BLOCK_D = triton.next_power_of_2(D)
    BM = block_m or max(1, min(64, tile // BLOCK_D))
    warps = num_warps or max(1, min(8, BM * BLOCK_D // 1024))
    return BM, BLOCK_D, warps


@triton.jit
def _rms_norm_gated_fwd_kernel(X, G, W, Y, M, D, stride_x, stride_g, stride_y, eps,
                               HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < M)[:, None] & col_ok[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_GATE:
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * (g * tl.sigmoid(g))
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_gated_bwd_kernel(DY, X, G, W, DX, DG, DW_PART, M, D, rows_per_program,
                               stride_dy, stride_x, stride_g, stride_dx, stride_dg, eps,
                               HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)

    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < last)[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        xh = x * rstd[:, None]
        if HAS_GATE:
            g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            u = dy * (g * sg)
            dg = dy * xh * sg * (1.0 + g * (1.0 - sg))
            if HAS_WEIGHT:
                dg = dg * w[None, :]
            tl.store(DG + rows[:, None] * stride_dg + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
        else:
            u = dy
        if HAS_WEIGHT:
            dw += tl.sum(u * xh, axis=0)
            dxh = u * w[None, :]
        else:
            dxh = u
        c = tl.sum(dxh * xh, axis=1) / D
        dx = (dxh - xh * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * D + cols, dw, mask=col_ok)


def rms_norm_gated_fwd(x: torch.Tensor, gate: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                       eps: float, block_m: Optional[int] = None,
                       num_warps: Optional[int] = None) -> torch.Tensor:
    """y = rmsnorm(x) * weight * silu(gate) over the last dim; y is contiguous, in x's dtype."""
    D = x.shape[-1]
    x2 = _rows(x, D)
    g2 = _rows(gate, D) if gate is not None else x2
    M = x2.shape[0]
    y = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M:
        BM, BD, warps = _blocks(D, _FWD_TILE, block_m, num_warps)
        with _device(x):
            _rms_norm_gated_fwd_kernel[(triton.cdiv(M, BM),)](
                x2, g2, weight if weight is not None else x2, y, M, D,
                x2.stride(0), g2.stride(0), y.stride(0), eps,
                HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None,
                BLOCK_M=BM, BLOCK_D=BD, num_warps=warps)
    return y.view(x.shape)


def _bwd_programs(x: torch.Tensor, M: int, BM: int) -> int:
    blocks = triton.cdiv(M, BM)
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return min(blocks, sms * _BWD_PROGRAMS_PER_SM)
    return min(blocks, 1 if _interpreting() else 4)  # the interpreter runs programs one by one


def rms_norm_gated_bwd(dy: torch.Tensor, x: torch.Tensor, gate: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor], eps: float, block_m: Optional[int] = None,
                       num_warps: Optional[int] = None,
                       programs: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                                Optional[torch.Tensor]]:
    """(dx, dgate, dweight): dgate is None without a gate, dweight None without a weight."""
    D = x.shape[-1]
    x2, dy2 = _rows(x, D), _rows(dy, D)
    g2 = _rows(gate, D) if gate is not None else x2
    M = x2.shape[0]
    dx = torch.empty(M, D, dtype=x.dtype, device=x.device)
    dg = torch.empty(M, D, dtype=gate.dtype, device=x.device) if gate is not None else None
    BM, BD, warps = _blocks(D, _BWD_TILE, block_m, num_warps)
    n = programs or _bwd_programs(x, M, BM)
    rows_per_program = triton.cdiv(triton.cdiv(M, max(n, 1)), BM) * BM
    n = triton.cdiv(M, rows_per_program) if M else 0
    dw_part = torch.empty(n, D, dtype=torch.float32, device=x.device) if weight is not None else None
    if n:
        with _device(x):
            _rms_norm_gated_bwd_kernel[(n,)](
                dy2, x2, g2, weight if weight is not None else x2, dx,
                dg if dg is not None else dx, dw_part if dw_part is not None else dx,
                M, D, rows_per_program, dy2.stride(0), x2.stride(0), g2.stride(0), dx.stride(0),
                dg.stride(0) if dg is not None else 0, eps,
                HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None,
                BLOCK_M=BM, BLOCK_D=BD, num_warps=warps)
    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    return dx.view(x.shape), dg.view(gate.shape) if dg is not None else None, dweight
