"""Packaging: the build-info check that keeps a _C built for another torch from loading, the
test dependencies being installed, and CI running the README's test command."""
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from gla_cuda import _build

ROOT = Path(__file__).resolve().parent.parent


def _info(torch_version, torch_cuda="13.0", cuda_version="13.0"):
    return types.SimpleNamespace(TORCH_VERSION=torch_version, TORCH_CUDA=torch_cuda, CUDA_VERSION=cuda_version)


def test_rendered_build_info_round_trips():
    text = _build.render("2.11.0+cu130", "13.0", "13.0")
    info = types.ModuleType("_build_info")
    exec(compile(text, "_build_info.py", "exec"), info.__dict__)
    assert (info.TORCH_VERSION, info.TORCH_CUDA, info.CUDA_VERSION) == ("2.11.0+cu130", "13.0", "13.0")
    assert _build.mismatch(info, "2.11.3+cu130", "13.0") is None


@pytest.mark.parametrize("running", ["2.14.1+cu130", "2.14.0", "2.14.2+cu131"])
def test_same_minor_release_loads(running):
    assert _build.mismatch(_info("2.14.1+cu130"), running, "13.1" if "cu131" in running else "13.0") is None


@pytest.mark.parametrize("built, running, running_cuda, says", [
    ("2.11.0", "2.14.1+cu130", "13.0", "built for torch 2.11 (CUDA 13.0) but torch 2.14.1+cu130 (CUDA 13.0)"),
    ("2.14.1", "2.14.1+cu126", "12.6", "but torch 2.14.1+cu126 (CUDA 12.6) is running"),
    ("2.14.1", "2.14.1+cpu", None, "but torch 2.14.1+cpu, a build without CUDA, is running"),
])
def test_other_torch_is_one_sentence(built, running, running_cuda, says):
    why = _build.mismatch(_info(built), running, running_cuda)
    assert says in why
    assert "compiled kernels are disabled" in why and "pip install --no-build-isolation" in why
    assert why.count(". ") == 0 and "\n" not in why  # one sentence


def test_local_label():
    assert _build.local_label("2.14.1+cu130", "13.0") == "cu130torch2.14"
    assert _build.local_label("2.6.0", "12.8") == "cu128torch2.6"


_FAKE_BUILD = """
import importlib.machinery, sys, types, warnings
# a _C and its build record from another torch minor release (the fake _C is never imported:
# the mismatch is found before that)
for name in ("gla_cuda._C", "gla_cuda._build_info"):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
info = sys.modules["gla_cuda._build_info"]
import torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
info.TORCH_VERSION, info.TORCH_CUDA, info.CUDA_VERSION = f"{major}.{minor - 1}.0", torch.version.cuda, "13.0"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gla_cuda
from gla_cuda.backends import cuda
mine = [str(w.message) for w in caught if "gla_cuda._C" in str(w.message)]
assert len(mine) == 1, mine
assert cuda._C is None and cuda.IMPORT_ERROR == mine[0], (cuda._C, cuda.IMPORT_ERROR)
q = torch.randn(1, 20, 2, 16)
g = torch.nn.functional.logsigmoid(torch.randn(1, 20, 2, 16))
choice = gla_cuda.explain_backend(q, q, q, g)
assert choice.reasons["cuda"] == mine[0], choice
o, _ = gla_cuda.chunk_gla(q, q, q, g)  # the other backends still run
assert o.shape == q.shape and torch.isfinite(o).all()
print(mine[0])
"""


def test_build_for_other_torch_warns_once_and_falls_back():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_FAKE_BUILD)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    major, minor = torch.__version__.split(".")[:2]
    assert f"gla_cuda._C was built for torch {major}.{int(minor) - 1} (CUDA 13.0)" in run.stdout


def _test_extra():
    """pyproject.toml's [project.optional-dependencies] test list (read without tomllib, 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    return re.findall(r'"([^"]+)"', re.search(r"^test = \[(.*?)\]", text, re.M | re.S).group(1))


def test_test_extras_are_installed():
    """A missing test dependency fails here, by name, instead of skipping tests elsewhere."""
    missing = []
    requirements = _test_extra()
    assert "pytest>=8" in requirements and "numpy" in requirements
    for req in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    assert not missing, f"{missing} not installed: pip install --no-build-isolation -e \".[test]\""


def test_triton_backend_imports_where_triton_is_installed():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not part of this torch install (its wheels cover Linux)")
    from gla_cuda.backends import triton as triton_backend
    assert triton_backend.IMPORT_ERROR is None


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='([^']+)'$", ci, re.M).group(1)
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text()
