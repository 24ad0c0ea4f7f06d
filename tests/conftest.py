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


# ----------------------------------------------------------------------------- fla's kernels on CPU
# flash-linear-attention (an optional test dependency) runs its Triton kernels on CPU tensors
# only under the interpreter (no GPU here). Two things the interpreter does not do as the
# compiler does are adjusted while the fla_kernels_on_cpu fixture is active:
# * autotuning times each configuration on a GPU driver: one configuration per kernel instead;
# * a `for i in range(n)` loop index is a Python int in the interpreter but a tensor when
#   compiled, and fla's kernels call tensor methods on it (i.to(tl.int64)): the index is made a
#   tensor, as assignments already are (the interpreter rewrites the kernel's source for those).
FLA_DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="fla's kernels run on the GPU here")),
               pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"))]


def _loop_index_tensors():
    import ast

    from triton.runtime import interpreter

    class Rewriter(interpreter.ASTTransformer):
        def visit_For(self, node):
            self.generic_visit(node)
            it = node.iter
            if isinstance(node.target, ast.Name) and isinstance(it, ast.Call) \
                    and isinstance(it.func, ast.Name) and it.func.id == "range":
                cvt = ast.Call(func=ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                                  attr="to_tensor", ctx=ast.Load()),
                               args=[ast.Name(id=node.target.id, ctx=ast.Load()), ast.Constant(value=False)],
                               keywords=[])
                node.body.insert(0, ast.Assign(targets=[ast.Name(id=node.target.id, ctx=ast.Store())], value=cvt))
            return node

    return interpreter, Rewriter()


@pytest.fixture
def fla_kernels_on_cpu(monkeypatch):
    """Without a GPU: fla's Triton kernels under the interpreter (see above). The interpreter's
    cache of rewritten kernels is replaced for the test, so no other test sees the rewrite."""
    if HAS_CUDA:
        return
    from triton.runtime import autotuner
    prune = autotuner.Autotuner.prune_configs
    monkeypatch.setattr(autotuner.Autotuner, "prune_configs", lambda self, kw: prune(self, kw)[:1])
    interpreter, rewriter = _loop_index_tensors()
    monkeypatch.setattr(interpreter.FunctionRewriter, "ast_transformer", rewriter)
    monkeypatch.setattr(interpreter.InterpretedFunction, "rewritten_fn", {})
