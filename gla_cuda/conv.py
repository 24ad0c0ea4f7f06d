"""ShortConvolution: the causal depthwise convolution (with SiLU) that GLA layers with
``use_short_conv`` apply to q, k and v, as fla's ``fla.modules.ShortConvolution``.

Parameters are those of a depthwise ``nn.Conv1d`` (weight [D, 1, W], bias [D]), so fla's
state_dict loads as is. Output t is act(bias + sum_j weight[:, j] * x[t - (W - 1) + j]).

The state carried between calls (the cache) is [N, D, W]: the last W inputs of each sequence,
oldest first, newest at index W - 1, in the input's dtype; fla's layout, so fla's cache and
ours hold the same thing. An output needs only the last W - 1 inputs, but fla keeps W, and
the decoding kernels of the causal-conv1d package read that layout in place.

Paths: the ``causal-conv1d`` package on CUDA tensors when installed ("causal_conv1d"),
``torch.nn.functional.conv1d`` otherwise ("torch"), and "reference": a gather formulation that
handles every layout (batch, packed cu_seqlens, padding masks, initial states) with static
shapes; "torch" uses it for packed sequences. All accumulate in float32 (float64 inputs in
float64) and return the input's dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gla_cuda.backends import compute_dtype
from gla_cuda.intermediates import token_sequence

IMPLS = ("auto", "causal_conv1d", "torch", "reference")

try:  # optional: Dao-AILab's causal-conv1d CUDA kernels
    from causal_conv1d import causal_conv1d_fn as _cc_fn
    from causal_conv1d import causal_conv1d_update as _cc_update
except ImportError:  # not installed (or built without CUDA): the torch paths run
    _cc_fn = _cc_update = None


def causal_conv1d_available() -> bool:
    return _cc_fn is not None


def _finish(y: Tensor, bias: Optional[Tensor], activation: bool, dtype: torch.dtype) -> Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    return (F.silu(y) if activation else y).to(dtype)


def _cc_usable(x: Tensor, weight: Tensor, impl: str) -> bool:
    """Whether the causal-conv1d kernels take these inputs (CUDA, width 2..4, half/float)."""
    if impl not in ("auto", "causal_conv1d"):
        return False
    if impl == "auto" and torch.compiler.is_compiling():
        return False  # the package's kernels are opaque to torch.compile; the torch path traces
    ok = (_cc_fn is not None and x.is_cuda and 2 <= weight.shape[-1] <= 4
          and x.dtype in (torch.float16, torch.bfloat16, torch.float32))
    if impl == "causal_conv1d" and not ok:
        why = ("the causal-conv1d package is not installed" if _cc_fn is None
               else f"it takes CUDA float16/bfloat16/float32 inputs with width 2..4, got {x.device} "
                    f"{x.dtype} width {weight.shape[-1]}")
        raise RuntimeError(f"impl='causal_conv1d' cannot run: {why}")
    return ok


def _gather_conv(xf: Tensor, seq: Tensor, pos: Tensor, state_rows: Tensor, weight: Tensor) -> Tensor:
    """Sum over taps of weight * input, each tap gathered from the flat inputs xf [M, D] (token m
    of sequence seq[m] at position pos[m]) or, before a sequence's start, from its state rows
    ([N * W, D]: sequence n's W cached inputs at n * W ... n * W + W - 1)."""
    M, W = xf.shape[0], weight.shape[-1]
    source = torch.cat([xf, state_rows])
    m = torch.arange(M, device=xf.device)
    y = None
    for lag in range(W):
        index = torch.where(pos >= lag, m - lag, M + seq * W + (W - lag) + pos)
        term = source.index_select(0, index) * weight[:, W - 1 - lag]
        y = term if y is None else y + term
    return y


def _state_rows(state: Optional[Tensor], N: int, D: int, W: int, like: Tensor) -> Tensor:
    if state is None:
        return like.new_zeros(N * W, D)
    return state.to(like.dtype).transpose(1, 2).reshape(N * W, D)


def _final_state(xf: Tensor, state_rows: Tensor, start: Tensor, length: Tensor, W: int,
                 dtype: torch.dtype) -> Tensor:
    """[N, D, W]: the last W inputs of each sequence (start, length into xf), reaching back into
    its initial state when it is shorter than W."""
    M, N = xf.shape[0], start.shape[0]
    u = length[:, None] - W + torch.arange(W, device=xf.device)  # [N, W] positions in the sequence
    n = torch.arange(N, device=xf.device)[:, None]
    index = torch.where(u >= 0, start[:, None] + u, M + n * W + W + u)
    source = torch.cat([xf, state_rows])
    return source.index_select(0, index.flatten()).view(N, W, -1).transpose(1, 2).to(dtype).contiguous()


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: bool = True,
                  initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                  cu_seqlens: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                  impl: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """x: [B, T, D]; weight: [D, W]; bias: [D] or None; activation: SiLU or none.
    initial_state: [N, D, W] or None (zeros). cu_seqlens: packed sequences (B = 1, N = its
    length - 1). mask: bool [B, T], True for tokens: masked positions are skipped as if absent
    (a token's window reaches back over them), their outputs are undefined (the caller zeroes them).
    Returns (y [B, T, D] in x's dtype, final state [N, D, W] in x's dtype or None).
    The caller validates shapes; the values of cu_seqlens are trusted here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    B, T, D = x.shape
    W = weight.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cdt = compute_dtype(x.dtype)
    dev = x.device

    order = None
    if mask is not None:
        # Stable sort: each row's tokens first, in order, then its masked positions. The
        # convolution then runs over the tokens alone, a batch whose rows end early.
        order = torch.argsort((~mask.bool()).to(torch.int8), dim=1, stable=True)
        x = x.gather(1, order[..., None].expand(B, T, D))
        length = mask.bool().sum(1)
    elif cu_seqlens is None:
        length = torch.full((B,), T, device=dev, dtype=torch.long)

    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        start, length = cu[:-1], cu[1:] - cu[:-1]
        t = torch.arange(T, device=dev)
        seq = token_sequence(cu, t)
        pos = t - start[seq]
    else:
        start = torch.arange(B, device=dev) * T

    xf = x.reshape(B * T, D)
    if cu_seqlens is not None and initial_state is None and T > 0 and _cc_usable(x, weight, impl):
        seq_idx = seq.to(torch.int32)[None]
        y = _cc_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx,
                   activation="silu" if activation else None).transpose(1, 2)
    elif cu_seqlens is not None or impl == "reference" or T == 0:
        if cu_seqlens is None:
            seq = torch.arange(B, device=dev).repeat_interleave(T)
            pos = torch.arange(T, device=dev).repeat(B)
        rows = _state_rows(initial_state, N, D, W, xf.to(cdt))
        y = _gather_conv(xf.to(cdt), seq, pos, rows, weight.to(cdt))
        y = _finish(y, bias, activation, x.dtype).view(B, T, D)
    elif _cc_usable(x, weight, impl):
        init = None
        if initial_state is not None:  # channel-last [B, D, W - 1], as the kernel requires
            init = initial_state[..., 1:].to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        y = _cc_fn(x.transpose(1, 2), weight, bias, initial_states=init,
                   activation="silu" if activation else None).transpose(1, 2)
    else:
        past = (x.new_zeros(B, D, W - 1, dtype=cdt) if initial_state is None
                else initial_state[..., 1:].to(cdt))
        y = F.conv1d(torch.cat([past, x.transpose(1, 2).to(cdt)], 2), weight.to(cdt)[:, None],
                     groups=D)
        # [B, T, D] in memory too: a transposed view's strides are undecidable for inductor
        # when T is symbolic (dynamic shapes).
        y = _finish(y.transpose(1, 2).contiguous(), bias, activation, x.dtype)

    final = None
    if output_final_state:
        rows = _state_rows(initial_state, N, D, W, xf)
        final = _final_state(xf, rows, start, length, W, x.dtype)
    if order is not None:  # back to the input's positions
        y = torch.empty_like(y).scatter(1, order[..., None].expand(B, T, D), y)
    return y, final


def causal_conv1d_step(x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       activation: bool = True, mask: Optional[Tensor] = None,
                       impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """One decoding step: x [N, 1, D], state [N, D, W] (not modified). mask: bool [N] or None;
    a masked row keeps its state. Returns (y [N, 1, D], the new state, a new tensor)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if mask is None and state.dtype == x.dtype and _cc_usable(x, weight, impl):
        new = state.clone()  # the kernel shifts its state argument in place
        y = _cc_update(x[:, 0], new, weight, bias, activation="silu" if activation else None)
        return y[:, None], new
    cdt = compute_dtype(x.dtype)
    window = torch.cat([state[..., 1:].to(x.dtype), x.transpose(1, 2)], 2)  # [N, D, W]
    y = (window.to(cdt) * weight.to(cdt)).sum(-1)
    y = _finish(y, bias, activation, x.dtype)[:, None]
    new = window.to(state.dtype)
    if mask is not None:
        new = torch.where(mask.bool()[:, None, None], new, state)
    return y, new


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time, then SiLU (activation="silu", as fla's GLA layer
    uses it) or nothing (activation=None). Same parameters as fla's ShortConvolution."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False,
                 activation: Optional[str] = "silu", device=None, dtype=None) -> None:
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1,
                         groups=hidden_size, bias=bias, device=device, dtype=dtype)
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")
        self.hidden_size, self.activation = hidden_size, activation
        self.impl = "auto"  # which path runs: one of IMPLS

    def forward(self, x: Tensor, cache: Optional[Tensor] = None, output_final_state: bool = False,
                cu_seqlens: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """x: [B, T, D] -> (y [B, T, D], the final state [N, D, W] if output_final_state)."""
        return causal_conv1d(x, self.weight[:, 0], self.bias, self.activation is not None, cache,
                             output_final_state, cu_seqlens, mask, self.impl)

    def step(self, x: Tensor, cache: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One token per row: x [N, 1, D], cache [N, D, W] -> (y, the new state; cache unchanged)."""
        return causal_conv1d_step(x, cache, self.weight[:, 0], self.bias, self.activation is not None,
                                  mask, self.impl)

    @property
    def state_size(self) -> int:
        return self.hidden_size * self.kernel_size[0]
