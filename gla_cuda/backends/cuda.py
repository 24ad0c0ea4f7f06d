"""Compiled CUDA backend: the kernels in csrc/, registered by gla_cuda._C.

The extension registers CUDA implementations of the private kernel ops
(``gla::cuda_*``, schemas in gla_cuda/ops.py); this module only asks it whether
a kernel covers the inputs and calls the op.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake  # fake tensors (torch.compile) have no address

from gla_cuda import _build, ops  # noqa: F401  (ops defines the schemas the extension implements)
from gla_cuda.intermediates import ChunkSlots


def _load_extension():
    """(_C, None), or (None, why not). A build for another torch is not imported (it would fail
    with an undefined symbol, or load and crash): that is said once, as a warning."""
    if importlib.util.find_spec("gla_cuda._C") is None:
        return None, ("the compiled extension gla_cuda._C is not built (installed without a CUDA "
                      "toolkit, or with GLA_CUDA_BUILD=0; README: Build options)")
    try:
        info = importlib.import_module(f"gla_cuda.{_build.INFO_MODULE}")
    except ImportError:
        info = None  # no record (a bare CMake build): just try
    why = info and _build.mismatch(info, torch.__version__, torch.version.cuda)
    if why:
        warnings.warn(why, RuntimeWarning, stacklevel=2)
        return None, why
    try:
        from gla_cuda import _C  # noqa: F401  (importing registers the kernels)
    except ImportError as e:
        return None, f"the compiled extension gla_cuda._C does not load ({e})"
    return _C, None


_C, IMPORT_ERROR = _load_extension()

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

# Ops with a compiled kernel; the rest are answered "no CUDA kernel yet" below.
KERNEL_OPS = ("chunk_fwd", "chunk_bwd", "recurrent_fwd", "recurrent_bwd", "recurrent_pool_fwd_",
              "chunk_pool_fwd_")


def unsupported_reason(op, q, k, v, g, initial_state, cu_seqlens) -> Optional[str]:
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, not a CUDA GPU"
    if op not in KERNEL_OPS:
        return f"no compiled kernel for {op} yet"
    if q.dtype not in _DTYPE_NAMES or g.dtype not in _DTYPE_NAMES:
        return f"dtype {q.dtype} is not supported"
    tensors = (q, k, v, g, initial_state)
    if any(x is not None and not is_fake(x) and x.data_ptr() % 16 for x in tensors):
        return "the kernels need 16-byte aligned tensors (a view with an odd offset is not)"
    args = (op, q.shape[1], q.shape[-1], v.shape[-1], _DTYPE_NAMES[q.dtype], _DTYPE_NAMES[g.dtype],
            _device_index(q.device))
    if all(isinstance(x, int) for x in args[1:4]):
        return _kernel_reason(*args)  # memoized: host time per call
    return _kernel_reason.__wrapped__(*args)  # symbolic sizes (torch.compile): not hashable


@functools.lru_cache(maxsize=1024)
def _kernel_reason(op, T, K, V, dtype, g_dtype, device_index):
    """What the extension says of a kernel for these sizes on this GPU (sizes and names only)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return _C.unsupported(op, T, K, V, dtype, g_dtype, major, minor, device_index)


def _device_index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


# The recurrent forward keeps one (sequence, head, V tile) per CTA walking every token: made
# for decoding. Measured on the H100 (bf16, K = V = 128): equal to Triton at 16 tokens per
# sequence (0.196 vs 0.197 ms at B 64, H 16), 1.16x slower at 2048 (4.83 vs 4.17 ms at B 8).
RECURRENT_FWD_AUTO_MAX_T = 16


# The chunked backward at K = 256: measured on the H100 (bf16, (8, 2048, 4, 256, 512), backward
# alone in one gla-bench run): 1.01 ms against Triton's 0.91 (at K = 64 and 128 it is 1.75x and
# 1.43x faster than Triton's). Its dq/dk/dg kernel takes 64-channel tiles of K with every V
# tile: at K = 256, V = 512 that is 4 x 8 tiles per chunk.
CHUNK_BWD_AUTO_MAX_K = 128


def auto_skip_reason(op, q, k, v, g, initial_state, cu_seqlens) -> Optional[str]:
    sequences = q.shape[0] if cu_seqlens is None else max(cu_seqlens.shape[0] - 1, 1)
    if op == "recurrent_fwd" and q.shape[0] * q.shape[1] > RECURRENT_FWD_AUTO_MAX_T * sequences:
        return (f"sequences average more than {RECURRENT_FWD_AUTO_MAX_T} tokens: the Triton "
                "recurrent kernel is as fast or faster there (forcing cuda runs it)")
    if op == "chunk_bwd" and q.shape[-1] > CHUNK_BWD_AUTO_MAX_K:
        return (f"K > {CHUNK_BWD_AUTO_MAX_K}: the Triton backward is faster there (forcing cuda "
                "runs the compiled one)")
    return None


def _int32(cu_seqlens):
    return None if cu_seqlens is None else cu_seqlens.to(torch.int32)  # on the device: no sync


def _fwd(kernel_op):
    def fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        o, ht = kernel_op(q, k, v, g, scale, initial_state, output_final_state, _int32(cu_seqlens))
        return o, (ht if output_final_state else None)
    return fwd


chunk_fwd = _fwd(torch.ops.gla.cuda_chunk_fwd)
recurrent_fwd = _fwd(torch.ops.gla.cuda_recurrent_fwd)


def chunk_fwd_saving(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """The forward, keeping the backward's intermediates (training; gla_cuda.intermediates)."""
    meta = ChunkSlots(q, cu_seqlens)
    o, ht, *saved = torch.ops.gla.cuda_chunk_fwd_saving(
        q, k, v, g, scale, initial_state, output_final_state, _int32(cu_seqlens), meta.chunk_off, meta.NC)
    return o, (ht if output_final_state else None), tuple(saved)


def chunk_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, saved=None):
    """The backward from the training forward's intermediates (saved); a backward called on
    its own runs the compiled training forward for them first."""
    meta = ChunkSlots(q, cu_seqlens)
    cu = _int32(cu_seqlens)
    if saved is None:
        _, _, *saved = torch.ops.gla.cuda_chunk_fwd_saving(q, k, v, g, scale, initial_state, False, cu,
                                                           meta.chunk_off, meta.NC)
    dq, dk, dv, dg, dh0 = torch.ops.gla.cuda_chunk_bwd_saved(q, k, v, g, scale, initial_state, cu, do, dht,
                                                             meta.chunk_off, meta.chunk_seq, *saved)
    return dq, dk, dv, dg, (dh0 if initial_state is not None else None)


def recurrent_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    dq, dk, dv, dg, dh0 = torch.ops.gla.cuda_recurrent_bwd(q, k, v, g, scale, initial_state,
                                                           _int32(cu_seqlens), do, dht)
    return dq, dk, dv, dg, (dh0 if initial_state is not None else None)


def recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index, state_v_first):
    return torch.ops.gla.cuda_recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index,
                                                  state_v_first)


def chunk_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                    final_state_indices, cu_seqlens, checkpoint_every, checkpoint_indices,
                    state_v_first, o):
    """The serving prefill: the chunked forward's walks read each sequence's start slot and
    write its final state and checkpoints to their slots, inside the kernel."""
    # a caller's `out` at an odd offset: the kernel writes 16 bytes at a time
    target = o if o.data_ptr() % 16 == 0 else torch.empty_like(o)
    torch.ops.gla.cuda_chunk_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                                       final_state_indices, _int32(cu_seqlens), checkpoint_every,
                                       checkpoint_indices, state_v_first, target)
    if target is not o:
        o.copy_(target)
