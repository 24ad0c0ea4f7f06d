"""Builds gla_cuda. CMake compiles the extension gla_cuda._C; this file drives it.

Environment variables:
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (default: found from nvcc on PATH)
  GLA_CUDA_BUILD=0        skip the extension (pure-Python install: Triton + reference)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0a")
  GLA_CUTLASS_DIR         another CUTLASS tree (default: the nvidia-cutlass wheel's headers)
  MAX_JOBS                parallel compile jobs (default: all cores)
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def find_cuda_home():
    """The toolkit directory, or None. Follows nvcc wrappers to the real toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return Path(os.environ[var]).resolve()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # `nvcc --dryrun` prints the toolkit it really runs from as TOP=
        out = subprocess.run([nvcc, "--dryrun", "x.cu"], capture_output=True, text=True).stderr
        top = re.search(r"TOP=(\S+)", out)
        if top and Path(top.group(1), "bin", "nvcc").exists():
            return Path(top.group(1)).resolve()
    except OSError:
        pass
    return Path(nvcc).resolve().parent.parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
               f"-DGLA_OUTPUT_DIR={out_dir}", f"-DCMAKE_CUDA_COMPILER={CUDA_HOME / 'bin' / 'nvcc'}",
               f"-DCUDAToolkit_ROOT={CUDA_HOME}"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir)] + cfg)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


class BuildPy(build_py):
    """Says once, while building, what this install holds (setup.py itself runs per hook)."""

    def run(self):
        if CUDA_HOME is None:
            why = "GLA_CUDA_BUILD=0" if os.environ.get("GLA_CUDA_BUILD") == "0" else "no CUDA toolkit found"
            print(f"gla_cuda: {why}: installing pure Python (Triton and reference backends only, "
                  "no compiled CUDA kernels)", file=sys.stderr)
        else:
            print(f"gla_cuda: building the CUDA extension with the toolkit at {CUDA_HOME}", file=sys.stderr)
        super().run()


CUDA_HOME = None if os.environ.get("GLA_CUDA_BUILD", "1") == "0" else find_cuda_home()
ext_modules = [] if CUDA_HOME is None else [CMakeExtension("gla_cuda._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy})
