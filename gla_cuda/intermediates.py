"""The training forward's kept intermediates: the contract between gla::chunk_fwd_train (a
forward that keeps them) and gla::chunk_bwd_saved (a backward that takes them).

Every backend that keeps or takes them (Triton, the compiled kernels) uses this one layout;
csrc/intermediates.h states the same layout for the compiled side. Pure torch: the fake
kernels (torch.compile) and the compiled backend use it without importing Triton.

Chunk slots. Time is cut into chunks of ``C_CHUNK`` tokens per sequence; a slot is a chunk's
index in the packed list of all chunks of all sequences (sequence 0's chunks, then sequence
1's, ...). ``chunk_off[n]`` is sequence n's first slot (int64 [N + 1]), ``chunk_seq[s]`` slot
s's sequence (int64 [NC]). ``NC = num_slots(...)`` is an upper bound read from shapes alone
(``B * cdiv(T, C)``, or ``T // C + N`` with cu_seqlens), so nothing synchronises with the host;
slots past ``chunk_off[N]`` belong to no sequence (chunk_seq says N) and hold nothing.

The six tensors, in this order (``NAMES``), q: [B, T, H, K], v: [B, T, H, V], B*T tokens:

    A       [B*T, H, C_CHUNK]   operand_dtype   the scaled intra-chunk scores, row t holding
                                                A[t, s] for the s of t's chunk (s <= t)
    flags   [NC, H]             int8            1 where a (slot, head) took the exact
                                                hierarchy (gates too strong for one
                                                reference row), else 0
    qx      [B, T, H, K]        operand_dtype   the backward's gated q: scale q exp(b - b_0)
    kd      [B, T, H, K]        operand_dtype   the gated k: k exp(Gamma - b)
    decays  [NC, H, 3, K]       float32         per slot: exp(Gamma), exp(Gamma - b_0), exp(b_0)
    states  [NC, H, K, V]       state_dtype     the state entering every slot

(b: the in-chunk cumulative sum of g, b_0 its first row, Gamma its last row.) Where no
intermediates are kept, chunk_fwd_train returns six empty [0] tensors (``placeholders``).
"""
from __future__ import annotations

import functools
import os

import torch

C_CHUNK = 64  # tokens per chunk
NAMES = ("A", "flags", "qx", "kd", "decays", "states")


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the scores A and the gated operands qx, kd: the dtype their products take,
    the input dtype; float32 for float32 inputs (exact float32 products) and for bfloat16
    under the Triton interpreter (its dot multiplies bfloat16 bit patterns as integers, and
    its float32 -> bfloat16 conversion truncates where the GPU rounds to nearest)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _triton_interpreter()):
        return torch.float32
    return dtype


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the kept per-slot states (and of the backward's state gradients): bfloat16
    for bfloat16 inputs (their products round to bfloat16 anyway; float32 under the Triton
    interpreter, as operand_dtype), float32 otherwise (float16's range is too narrow)."""
    return torch.bfloat16 if dtype == torch.bfloat16 and not _triton_interpreter() else torch.float32


def num_slots(q, cu_seqlens, C: int = C_CHUNK):
    """Chunk slots of the packed batch (NC), from shapes alone (works on fake tensors)."""
    B, T = q.shape[0], q.shape[1]
    return B * ((T + C - 1) // C) if cu_seqlens is None else T // C + cu_seqlens.shape[0] - 1


class ChunkSlots:
    """The slot bookkeeping of one batch, built on q's device from shapes only: ``cu``
    (int64 sequence boundaries), ``chunk_off``, ``chunk_seq``, ``N`` sequences, ``NC`` slots."""

    def __init__(self, q, cu_seqlens, C: int = C_CHUNK):
        B, T = q.shape[0], q.shape[1]
        if cu_seqlens is None:
            # the same for every call of a shape: built once (host time per call), except
            # while a CUDA graph is captured (tensors made then live in the graph's pool)
            capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
            make = _dense_slots.__wrapped__ if capturing else _dense_slots
            self.cu, self.chunk_off, self.chunk_seq, self.N, self.NC = make(B, T, C, q.device)
            return
        self.cu = cu_seqlens.to(torch.int64)
        lens = self.cu[1:] - self.cu[:-1]
        nch = torch.div(lens + (C - 1), C, rounding_mode="floor")
        self.chunk_off = torch.cat([self.cu.new_zeros(1), torch.cumsum(nch, 0)])
        self.NC = num_slots(q, cu_seqlens, C)
        self.chunk_seq = _chunk_seq(self.chunk_off, self.NC, q.device)
        self.N = cu_seqlens.numel() - 1


def token_sequence(cu, positions):
    """The sequence holding each packed token position (cu: int32/int64 offsets [N + 1]),
    computed on the device (no host read). A sequence of length 0 holds none; positions at or
    past the end map to the last sequence, so that the result indexes [N] tensors (N >= 1)."""
    return torch.searchsorted(cu[1:].contiguous(), positions.to(cu.dtype), right=True).clamp(
        max=max(cu.shape[0] - 2, 0))


def _chunk_seq(chunk_off, NC, dev):
    """slot -> sequence, from the cumulative chunk counts."""
    slots = torch.arange(NC, device=dev, dtype=torch.int64)
    return torch.searchsorted(chunk_off[1:].contiguous(), slots, right=True)


@functools.lru_cache(maxsize=64)
def _dense_slots(B, T, C, dev):
    """ChunkSlots of a batch without cu_seqlens: boundaries 0, T, 2T, ... (never written to)."""
    NT = (T + C - 1) // C
    cu = torch.arange(0, B + 1, device=dev, dtype=torch.int64) * T
    chunk_off = torch.arange(0, B + 1, device=dev, dtype=torch.int64) * NT
    return cu, chunk_off, _chunk_seq(chunk_off, B * NT, dev), B, B * NT


def saved_like(q, k, v, g, cu_seqlens):
    """Empty tensors in the layout above, in NAMES' order (works on fake tensors)."""
    B, T, H, K = q.shape
    NC, V = num_slots(q, cu_seqlens), v.shape[-1]
    dt = operand_dtype(q.dtype)
    return (q.new_empty(B * T, H, C_CHUNK, dtype=dt), q.new_empty(NC, H, dtype=torch.int8),
            q.new_empty(q.shape, dtype=dt), q.new_empty(q.shape, dtype=dt),
            q.new_empty(NC, H, 3, K, dtype=torch.float32),
            q.new_empty(NC, H, K, V, dtype=state_dtype(v.dtype)))


def placeholders(q):
    """What chunk_fwd_train returns in their place where nothing is kept: six [0] tensors."""
    return tuple(q.new_empty(0) for _ in NAMES)


def kept(saved) -> bool:
    """Whether chunk_fwd_train's last six outputs hold intermediates (not placeholders)."""
    return len(saved) == len(NAMES) and saved[0].dim() > 1
