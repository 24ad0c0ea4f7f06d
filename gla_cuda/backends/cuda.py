"""Compiled CUDA backend: the kernels in csrc/, registered by gla_cuda._C.

The extension registers CUDA implementations of the private kernel ops
(``gla::cuda_*``, schemas in gla_cuda/ops.py); this module only asks it whether
a kernel covers the inputs and calls the op.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake  # fake tensors (torch.compile) have no address

from gla_cuda import ops  # noqa: F401  (defines the schemas the extension implements)

try:
    from gla_cuda import _C  # noqa: F401  (importing registers the kernels)
    IMPORT_ERROR = None
except ImportError as e:
    _C = None
    IMPORT_ERROR = f"the compiled extension gla_cuda._C is not available ({e})"

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

# Ops with a compiled kernel; the rest are answered "no CUDA kernel yet" below.
KERNEL_OPS = ("chunk_fwd", "chunk_bwd", "recurrent_fwd", "recurrent_bwd", "recurrent_pool_fwd_")


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
    return _C.unsupported(op, T, K, V, dtype, g_dtype, major, minor)


def _device_index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


# The recurrent forward keeps one (sequence, head, V tile) per CTA walking every token: made
# for decoding. Measured on the H100 (bf16, K = V = 128): equal to Triton at 16 tokens per
# sequence (0.196 vs 0.197 ms at B 64, H 16), 1.16x slower at 2048 (4.83 vs 4.17 ms at B 8).
RECURRENT_FWD_AUTO_MAX_T = 16

# The chunked backward runs one CTA per (sequence, head, V tile of 64) down the whole sequence,
# one CTA per SM, with no segment splitting yet: with few CTAs the GPU idles. Measured on the
# H100 (bf16, K = V = 128, 16K tokens): 128 CTAs 2.96 ms vs Triton 3.35; 64 CTAs 4.53 vs 3.19.
CHUNK_BWD_AUTO_MIN_CTAS_PER_SM = 0.75
# Largest head dim K at which auto takes the compiled chunked backward (H100, bf16, side by
# side): above it the Triton one is faster, 1.763 vs 2.563 ms at (8, 2048, 16, 128, 128); at
# K = 64 the compiled one is 1.6x faster (2.037 vs 3.254 ms at (32, 2048, 16, 64, 64)). The
# compiled forward is taken at every K it covers: at K = 256 its two-stage form is the faster
# one, 0.224 vs 0.446 ms (Triton) at (8, 2048, 4, 256, 512) (gla-bench, 2026-11-23).
CHUNK_BWD_AUTO_MAX_K = 64


@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def auto_skip_reason(op, q, k, v, g, initial_state, cu_seqlens) -> Optional[str]:
    sequences = q.shape[0] if cu_seqlens is None else max(cu_seqlens.shape[0] - 1, 1)
    if op == "recurrent_fwd" and q.shape[0] * q.shape[1] > RECURRENT_FWD_AUTO_MAX_T * sequences:
        return (f"sequences average more than {RECURRENT_FWD_AUTO_MAX_T} tokens: the Triton "
                "recurrent kernel is as fast or faster there (forcing cuda runs it)")
    if op == "chunk_bwd":
        K = q.shape[-1]
        if K > CHUNK_BWD_AUTO_MAX_K:
            return (f"K={K}: the Triton chunked backward is faster above K={CHUNK_BWD_AUTO_MAX_K} "
                    "(forcing cuda runs it)")
        ctas = sequences * q.shape[2] * -(-v.shape[-1] // 64)
        sms = _num_sms(_device_index(q.device))
        if ctas < CHUNK_BWD_AUTO_MIN_CTAS_PER_SM * sms:
            return (f"{ctas} (sequence, head, V tile) CTAs for {sms} SMs: the compiled backward does not "
                    "split long sequences yet, the Triton one is faster here (forcing cuda runs it)")
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
    """The forward, keeping the Triton backward's intermediates (training; in its layout:
    the slot bookkeeping comes from there)."""
    from gla_cuda.backends.triton import chunk as triton_chunk
    meta = triton_chunk._Meta(q, cu_seqlens)
    o, ht, *saved = torch.ops.gla.cuda_chunk_fwd_saving(
        q, k, v, g, scale, initial_state, output_final_state, _int32(cu_seqlens), meta.chunk_off, meta.NC)
    return o, (ht if output_final_state else None), tuple(saved)


def chunk_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    dq, dk, dv, dg, dh0 = torch.ops.gla.cuda_chunk_bwd(q, k, v, g, scale, initial_state,
                                                       _int32(cu_seqlens), do, dht)
    return dq, dk, dv, dg, (dh0 if initial_state is not None else None)


def recurrent_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    dq, dk, dv, dg, dh0 = torch.ops.gla.cuda_recurrent_bwd(q, k, v, g, scale, initial_state,
                                                           _int32(cu_seqlens), do, dht)
    return dq, dk, dv, dg, (dh0 if initial_state is not None else None)


def recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index, state_v_first):
    return torch.ops.gla.cuda_recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index,
                                                  state_v_first)
