"""Triton backend: chunked and recurrent GLA kernels written for this project.

Runs on any GPU Triton supports and, under TRITON_INTERPRET=1, on CPU tensors
(that is how CI tests it).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401
    IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the install
    IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

MAX_K, MAX_V = 256, 512
NORM_MAX_D = 8192  # the fused RMSNorm's longest row
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(op, q, k, v, g, initial_state, cu_seqlens) -> Optional[str]:
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if op == "recurrent_pool_fwd_":
        return "no Triton kernel for the pooled decode op"
    if op == "recurrent_gv_fwd":
        return "no Triton kernel for the value gate gv"
    if q.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if q.device.type not in ("cpu", "cuda"):
        return f"device type {q.device.type} is not supported"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8 and q.dtype == torch.bfloat16:
            return f"bfloat16 needs sm_80 or newer, the GPU is sm_{major}{minor}"
    tokens = q.shape[0] * q.shape[1]
    if isinstance(tokens, int) and tokens >= 2**31:
        return f"B*T = {tokens} tokens: the kernels index tokens in int32 (fewer than 2**31)"
    if q.shape[-1] > MAX_K:
        return f"K={q.shape[-1]} is larger than {MAX_K}"
    if v.shape[-1] > MAX_V:
        return f"V={v.shape[-1]} is larger than {MAX_V}"
    return None


def norm_unsupported_reason(x, gate, weight) -> Optional[str]:
    """Why the fused RMSNorm kernel (norm.py) cannot run these tensors, or None."""
    if IMPORT_ERROR:
        return IMPORT_ERROR
    tensors = [t for t in (x, gate, weight) if t is not None]
    if any(t.dtype not in _DTYPES for t in tensors):
        return "dtypes other than float16, bfloat16, float32 run only on the reference"
    if x.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if x.device.type not in ("cpu", "cuda"):
        return f"device type {x.device.type} is not supported"
    if x.device.type == "cuda" and any(t.dtype == torch.bfloat16 for t in tensors):
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 8:
            return f"bfloat16 needs sm_80 or newer, the GPU is sm_{major}{minor}"
    if x.shape[-1] > NORM_MAX_D:
        return f"D={x.shape[-1]} is larger than {NORM_MAX_D}"
    return None


if IMPORT_ERROR is None:
    from .chunk import chunk_bwd, chunk_fwd, chunk_fwd_saving  # noqa: E402,F401
    from .norm import rms_norm_gated_bwd, rms_norm_gated_fwd  # noqa: E402,F401
    from .recurrent import recurrent_bwd, recurrent_fwd  # noqa: E402,F401
    from .pool import chunk_pool_fwd_, recurrent_verify_pool_fwd_  # noqa: E402,F401
