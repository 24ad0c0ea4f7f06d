"""Which backend runs an op, and why the others do not.

Order of preference: the compiled CUDA kernels, then Triton, then the PyTorch
reference; under "auto" a backend can also pass inputs it runs slower than the next one
(its ``auto_skip_reason``, measured, shown in the report). On CPU tensors "auto" means the reference; Triton runs CPU tensors
only when forced under TRITON_INTERPRET=1 (how CI tests it).
A backend is forced with the ``backend=`` argument or the GLA_BACKEND variable.

Empty inputs (a size of 0 in B, T, H, K or V, or no sequences) never reach a backend,
whichever is requested: ``run`` writes their results here (EMPTY, below) without launching
anything, so every backend, the compiled one included, gives the same shaped results.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from gla_cuda.backends import OPS, compute_dtype

BACKENDS = ("cuda", "triton", "reference")
EMPTY = "empty"  # Choice.backend of empty inputs: results written by this module, no kernel


_MODULES: dict = {}


def backend_module(name: str):
    if name not in _MODULES:  # import_module per call costs host time
        _MODULES[name] = importlib.import_module(f"gla_cuda.backends.{name}")
    return _MODULES[name]


def requested_backend(backend: Optional[str]) -> str:
    """The argument, else $GLA_BACKEND, else "auto"; validated."""
    name = backend if backend is not None else os.environ.get("GLA_BACKEND", "auto")
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        source = "backend" if backend is not None else "GLA_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


@dataclass
class Choice:
    op: str
    requested: str
    backend: Optional[str]                      # None: nothing can run
    reasons: dict = field(default_factory=dict)  # backend -> why it does not run (None: it can)

    def __str__(self) -> str:
        if self.backend == EMPTY:
            return (f"gla.{self.op}: requested {self.requested!r} -> no kernel: "
                    f"{self.reasons[EMPTY]}")
        none = ("no backend can run these inputs" if self.requested == "auto"
                else f"{self.requested} cannot run these inputs")
        lines = [f"gla.{self.op}: requested {self.requested!r} -> {self.backend or none}"]
        for name in BACKENDS:
            why = self.reasons.get(name)
            state = ("runs" if name == self.backend else "not evaluated" if name not in self.reasons
                     else "available" if why is None else why)
            lines.append(f"  {name:<10} {state}")
        return "\n".join(lines)


def _reason(name, op, q, k, v, g, initial_state, cu_seqlens) -> Optional[str]:
    if q.dtype == torch.float64 and name != "reference":
        return "float64 runs only on the reference"
    try:
        module = backend_module(name)
    except Exception as e:  # a broken optional backend must not break the others
        return f"failed to import ({type(e).__name__}: {e})"
    return module.unsupported_reason(op, q, k, v, g, initial_state, cu_seqlens)


def _inputs_key(q, k, v, g, initial_state, cu_seqlens):
    """All that the backends' answers depend on besides op and backend: sizes, dtypes, device,
    16-byte alignment, which optional inputs are given (and the Triton interpreter switch);
    None where it cannot be read (symbolic sizes, fake tensors under torch.compile)."""
    sizes = (*q.shape, v.shape[-1])
    if not all(type(s) is int for s in sizes) or is_fake(q):
        return None
    aligned = tuple(x is None or x.data_ptr() % 16 == 0 for x in (q, k, v, g, initial_state))
    cu = None if cu_seqlens is None else cu_seqlens.shape[0]
    return (sizes, q.device, q.dtype, g.dtype, initial_state is None, cu, aligned,
            os.environ.get("TRITON_INTERPRET"))


_CHOICES: dict = {}


def choose(op, q, k, v, g, initial_state=None, cu_seqlens=None, backend=None, full=True) -> Choice:
    """Picks the backend for ``op`` on these inputs (shapes, dtypes and device only).
    ``full=False`` (every op call) stops at the backend that runs: the later ones' reasons
    are not evaluated, and the report says so; its answers are memoized per inputs' key
    (host time per call)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    requested = requested_backend(backend)
    key = None if full else _inputs_key(q, k, v, g, initial_state, cu_seqlens)
    if key is None:
        return _choose(op, q, k, v, g, initial_state, cu_seqlens, requested, full)
    key = (op, requested) + key
    if key not in _CHOICES:
        if len(_CHOICES) > 4096:
            _CHOICES.clear()
        _CHOICES[key] = _choose(op, q, k, v, g, initial_state, cu_seqlens, requested, full)
    return _CHOICES[key]


def _size_is_zero(n) -> bool:
    """n == 0 without installing a guard on a symbolic size (torch.compile)."""
    if type(n) is int:
        return n == 0
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    return guard_or_false(n == 0)


def empty_reason(q, v, cu_seqlens=None) -> Optional[str]:
    """Why these inputs have no work (a size of 0), or None."""
    B, T, H, K = q.shape
    named = [("B", B), ("T", T), ("H", H), ("K", K), ("V", v.shape[-1])]
    if cu_seqlens is not None:
        named.append(("N (cu_seqlens has one offset)", cu_seqlens.shape[0] - 1))
    zero = [name for name, n in named if _size_is_zero(n)]
    if not zero:
        return None
    return (f"empty inputs ({', '.join(z.split(' ')[0] + ' = 0' for z in zero)}): "
            "gla_cuda.dispatch writes the results (zeros; the final state is the initial one) "
            "without launching a kernel, whatever the backend")


def _choose(op, q, k, v, g, initial_state, cu_seqlens, requested, full) -> Choice:
    why_empty = empty_reason(q, v, cu_seqlens)
    if why_empty is not None:
        if op in _EMPTY_OPS:
            return Choice(op, requested, EMPTY, {EMPTY: why_empty})
        # the pool ops' empty results are not all zeros (a sequence of no tokens still moves its
        # state to its output slot): the reference computes them, at any size, on any device
        return Choice(op, requested, "reference",
                      {name: None if name == "reference" else f"{why_empty.split(':')[0]}: the reference "
                       "computes them" for name in BACKENDS})
    order = BACKENDS if q.device.type == "cuda" else ("reference",)
    reasons, chosen = {}, None
    for name in BACKENDS:
        if chosen is not None and not full:
            break
        if requested != "auto" and name != requested and not full:
            continue
        why = _reason(name, op, q, k, v, g, initial_state, cu_seqlens)
        if requested == "auto" and why is None:
            if name not in order:
                why = f"not chosen automatically for {q.device.type} tensors"
            else:  # it can run; a backend may still leave these inputs to the next
                skip = getattr(backend_module(name), "auto_skip_reason", None)
                why = skip and skip(op, q, k, v, g, initial_state, cu_seqlens)
        reasons[name] = why
        if why is None and chosen is None and (requested == "auto" or name == requested):
            chosen = name
    return Choice(op, requested, chosen, reasons)


def run(op, q, k, v, g, initial_state, cu_seqlens, backend, *args):
    """Runs ``op`` on the chosen backend; raises, saying why, if none can run: a forced backend
    in one sentence, "auto" with every backend's reason."""
    choice = choose(op, q, k, v, g, initial_state, cu_seqlens, backend, full=False)
    if choice.backend is None:
        if choice.requested != "auto":
            raise RuntimeError(f"gla_cuda: backend {choice.requested!r} cannot run {op} on these inputs: "
                               f"{choice.reasons[choice.requested]}")
        choice = choose(op, q, k, v, g, initial_state, cu_seqlens, backend)
        raise RuntimeError(f"gla_cuda: no backend can run {op} on these inputs:\n{choice}")
    if choice.backend == EMPTY:
        return _EMPTY_OPS[op](q, k, v, g, *args)
    return getattr(backend_module(choice.backend), op)(q, k, v, g, *args)


# ----------------------------------------------------------------------------
# Results of empty inputs (the backends' contract, gla_cuda/backends/__init__.py, with no
# tokens, heads, channels or sequences to run): nothing depends on the inputs' values.
# ----------------------------------------------------------------------------

def _empty_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    # o has no elements unless K == 0 (op-level calls only: the API rejects K = 0), where
    # it is 0; no token changes a state when a size is 0, so the final state is the first
    o = v.new_zeros(v.shape)
    if not output_final_state:
        return o, None
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        return o, initial_state.clone()
    return o, q.new_zeros(N, q.shape[2], q.shape[3], v.shape[-1], dtype=compute_dtype(q.dtype))


def _empty_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht):
    grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(g))
    if initial_state is None:
        return grads + (None,)
    # no token between them: the initial state's gradient is the final state's
    dh0 = dht.to(initial_state.dtype, copy=True) if dht is not None else torch.zeros_like(initial_state)
    return grads + (dh0,)


def _empty_pool(q, k, v, g, scale, state_pool, state_index, state_v_first):
    return v.new_zeros(v.shape)  # no token: every state stays as it is


_EMPTY_OPS = {"chunk_fwd": _empty_fwd, "recurrent_fwd": _empty_fwd, "chunk_bwd": _empty_bwd,
              "recurrent_bwd": _empty_bwd, "recurrent_pool_fwd_": _empty_pool}


# The backends whose chunked backward can take the forward's intermediates, and those whose
# forward can keep them (gla::chunk_fwd_train); one layout for all: gla_cuda/intermediates.py.
SAVED_BACKWARDS = ("cuda", "triton")
SAVING_FORWARDS = ("cuda", "triton")


def saving_backend(q, k, v, g, initial_state=None, cu_seqlens=None, backend=None) -> Optional[str]:
    """In training, the backend whose forward keeps intermediates for the backward: the one
    that runs chunk_fwd on these inputs, when the one that runs chunk_bwd can take them;
    else None (the forward keeps nothing, the backward recomputes). From shapes, dtypes
    and devices only, so that the fake kernel (torch.compile) and the real one agree."""
    bwd = choose("chunk_bwd", q, k, v, g, initial_state, cu_seqlens, backend, full=False).backend
    if bwd not in SAVED_BACKWARDS:
        return None
    fwd = choose("chunk_fwd", q, k, v, g, initial_state, cu_seqlens, backend, full=False).backend
    return fwd if fwd in SAVING_FORWARDS else None


# The fused RMSNorm of the GLA layer (gla::rms_norm_gated) has a Triton kernel and the
# reference; "cuda" (from GLA_BACKEND) means auto for it: there is no compiled norm kernel.
NORM_BACKENDS = ("triton", "reference")


def norm_backend(x, gate=None, weight=None, backend="auto") -> str:
    """The backend that runs rms_norm_gated on these tensors: Triton for the GPU tensors it
    covers, else the reference; raises, saying why, if a forced one cannot run them."""
    if backend == "auto":
        env = os.environ.get("GLA_BACKEND", "auto")
        backend = env if env in NORM_BACKENDS else "auto"
    if backend not in NORM_BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {NORM_BACKENDS + ('auto',)}, got {backend!r}")
    if backend == "reference":
        return backend
    why = backend_module("triton").norm_unsupported_reason(x, gate, weight)
    if backend == "triton" and why is not None:
        raise RuntimeError(f"gla_cuda: backend 'triton' cannot run rms_norm_gated on these inputs: {why}")
    return "triton" if why is None and (backend == "triton" or x.device.type == "cuda") else "reference"
