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
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(op, q, k, v, g, initial_state, cu_seqlens) -> Optional[str]:
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if op == "recurrent_pool_fwd_":
        return "no Triton kernel for the pooled decode op"
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
    if q.shape[-1] > MAX_K:
        return f"K={q.shape[-1]} is larger than {MAX_K}"
    if v.shape[-1] > MAX_V:
        return f"V={v.shape[-1]} is larger than {MAX_V}"
    return None


if IMPORT_ERROR is None:
    from .chunk import chunk_bwd, chunk_fwd  # noqa: E402,F401
    from .recurrent import recurrent_bwd, recurrent_fwd  # noqa: E402,F401
