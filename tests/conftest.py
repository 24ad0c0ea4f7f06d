"""Shared test helpers: devices, backends and skips; thresholds, inputs and the float64
oracle come from gla_cuda.testing (re-exported here).

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, set
here before anything imports Triton.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The compiled kernels fill their outputs with NaN before each launch: unwritten elements fail.
os.environ.setdefault("GLA_DEBUG_POISON", "1")
# The CPU cases are small: one thread avoids oversubscription, which slows them many times over.
torch.set_num_threads(1)

import gla_cuda  # noqa: E402
from gla_cuda import dispatch  # noqa: E402
# inputs, the float64 oracle, error norms and thresholds: shared with the benchmark
from gla_cuda.testing import TOL, make_inputs, oracle, rel_err  # noqa: E402,F401

# GLA_TEST_DEVICES=cuda runs only the GPU half (the device script does; CI covers the CPU half).
_ALL_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"))]
_WANTED = os.environ.get("GLA_TEST_DEVICES", "cpu,cuda").split(",")
DEVICES = [d for d in _ALL_DEVICES if (d if isinstance(d, str) else d.values[0]) in _WANTED]
BACKENDS = list(dispatch.BACKENDS)
MODES = {"chunk": gla_cuda.chunk_gla, "recurrent": gla_cuda.fused_recurrent_gla}


def _choice(op, backend, ins, cu_seqlens):
    return dispatch.choose(op, ins["q"], ins["k"], ins["v"], ins["g"], ins.get("initial_state"),
                           cu_seqlens, backend)


def runs(op, backend, ins, cu_seqlens=None) -> bool:
    return _choice(op, backend, ins, cu_seqlens).backend is not None


def skip_unless_runs(op, backend, ins, cu_seqlens=None):
    choice = _choice(op, backend, ins, cu_seqlens)
    if choice.backend is None:
        pytest.skip(f"{backend} cannot run {op}: {choice.reasons.get(backend)}")
