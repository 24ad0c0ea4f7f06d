"""Builds gla_cuda. CMake compiles the extension gla_cuda._C; this file drives it.

Environment variables:
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (default: found from nvcc on PATH)
  GLA_CUDA_BUILD=0        skip the extension (pure-Python install: Triton + reference)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0a")
  GLA_CUTLASS_DIR         another CUTLASS tree (default: the pinned release, third_party/README.md)
  MAX_JOBS                parallel compile jobs (default: all cores)

The CMake build directory is build/cmake-<python tag> in the source tree and is kept: an
editable install, a wheel and a reinstall share it, so ninja recompiles only what changed.
pip hides a build's output unless run with -v; the few progress lines below also go to the
terminal (/dev/tty) when there is one, so a 15-minute compile does not look like a hang.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# A clean build of every kernel file on 2 cores (TORCH_CUDA_ARCH_LIST "8.0;9.0a"); two files
# take 7.5 minutes each, so more cores bring it down to about that and no further.
CLEAN_BUILD_S_2_CORES, LONGEST_FILE_S = 820, 450


def _load_build_module():
    """gla_cuda/_build.py by path: importing the package would import torch and _C."""
    spec = importlib.util.spec_from_file_location("_gla_build", ROOT / "gla_cuda" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()

_tty = None


def say(msg, terminal_only=False):
    """A progress line for the user: stderr (pip shows it with -v, and on failure) and the
    terminal, which pip's default verbosity would otherwise leave silent."""
    global _tty
    line = f"gla_cuda: {msg}"
    if not terminal_only:
        print(line, file=sys.stderr, flush=True)
    if _tty is None:
        try:
            _tty = open("/dev/tty", "w")
            _tty.write("\n")  # off the line where pip draws its spinner
        except OSError:
            _tty = False
    if _tty:
        _tty.write(line + "\n")
        _tty.flush()


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


def cuda_version(cuda_home):
    out = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    if not found:
        raise RuntimeError(f"gla_cuda: cannot read the CUDA version from {cuda_home}/bin/nvcc --version")
    return found.group(1)


def running_torch():
    """(torch.__version__, torch.version.cuda) of the torch the extension is compiled against."""
    try:
        import torch
    except ImportError as e:
        raise RuntimeError("gla_cuda: building the CUDA extension needs torch installed first "
                           "(pip install torch, then pip install --no-build-isolation .), or set "
                           "GLA_CUDA_BUILD=0 for the pure-Python install") from e
    return torch.__version__, torch.version.cuda


def base_version():
    text = (ROOT / "gla_cuda" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def cmake_build_dir():
    tag = f"{sys.implementation.cache_tag or 'py'}"  # cpython-311: one directory per interpreter
    return ROOT / "build" / f"cmake-{tag}"


def cached_generator(build_dir):
    """The generator an existing build directory was configured with (CMake refuses another)."""
    cache = build_dir / "CMakeCache.txt"
    if cache.exists():
        found = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.+)$", cache.read_text(), re.M)
        if found:
            return found.group(1)
    return None


def cuda_compile_count(build_dir):
    """How many CUDA files the build compiles (from build.ninja; None for other generators)."""
    ninja_file = build_dir / "build.ninja"
    if not ninja_file.exists():
        return None
    return len(re.findall(r"^build \S+\.cu\.o:", ninja_file.read_text(), re.M))


def _minutes(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        start = time.monotonic()
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = cmake_build_dir()
        # _C is linked inside the build directory and copied out: the configure arguments stay
        # the same for an editable install (a new temporary build_lib each time), a wheel and
        # a reinstall, so ninja has nothing to redo between them
        built_dir = build_dir / "out"
        generator = cached_generator(build_dir) or ("Ninja" if shutil.which("ninja") else None)
        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
               f"-DGLA_OUTPUT_DIR={built_dir}", f"-DCMAKE_CUDA_COMPILER={CUDA_HOME / 'bin' / 'nvcc'}",
               f"-DCUDAToolkit_ROOT={CUDA_HOME}"]
        if generator:
            cfg += ["-G", generator]
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)

        say(f"configuring CMake in {build_dir}")
        configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir)] + cfg,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stderr.write(configure.stdout)
        for line in configure.stdout.splitlines():  # CMakeLists.txt's own summary lines
            if line.startswith("-- gla_cuda:"):
                say(line[len("-- gla_cuda: "):], terminal_only=True)  # already on stderr
        if configure.returncode:
            raise RuntimeError(f"gla_cuda: CMake configure failed (exit {configure.returncode}); "
                               "its output is above")

        est = max(LONGEST_FILE_S, CLEAN_BUILD_S_2_CORES * 2 / jobs)
        units = cuda_compile_count(build_dir)
        say(f"building with {jobs} jobs: a clean build compiles {units or 'the'} CUDA translation "
            f"units and takes about {round(est / 60)} minutes here; a rebuild compiles only what changed")
        compiled = self._build(build_dir, jobs)
        if not compiled:
            say("nothing to recompile")
        built = sorted(built_dir.glob("_C.*.so")) or sorted(built_dir.glob("_C*.so"))
        if not built:
            raise RuntimeError(f"gla_cuda: the build left no _C*.so in {built_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)
        self._info = target.parent / f"{_build.INFO_MODULE}.py"
        self._info.write_text(_build.render(*TORCH, CUDA_VERSION))
        say(f"built gla_cuda._C for torch {TORCH[0]}, CUDA {CUDA_VERSION} in "
            f"{_minutes(time.monotonic() - start)}")

    @staticmethod
    def _build(build_dir, jobs):
        """cmake --build, its output to stderr; each compile step ninja reports is one progress
        line. Returns how many files it compiled."""
        proc = subprocess.Popen(["cmake", "--build", str(build_dir), "-j", str(jobs)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        start, compiled = time.monotonic(), 0
        for line in proc.stdout:
            sys.stderr.write(line)
            step = re.match(r"\[(\d+)/(\d+)\] Building \w+ object \S*?([^/\s]+)\.o\b", line)
            if step:
                compiled += 1
                say(f"[{step.group(1)}/{step.group(2)}] {_minutes(time.monotonic() - start)} {step.group(3)}")
        if proc.wait():
            raise RuntimeError(f"gla_cuda: the extension build failed (exit {proc.returncode}); "
                               "the compiler output is above (pip shows it with -v)")
        return compiled

    def run(self):
        super().run()
        info = getattr(self, "_info", None)
        if self.inplace and info:  # editable install: _C was copied to the source tree; so is this
            shutil.copyfile(info, ROOT / "gla_cuda" / info.name)


class BuildPy(build_py):
    """Says once, while building, what this install holds (setup.py itself runs per hook)."""

    def find_package_modules(self, package, package_dir):
        # the build info of an earlier in-place build describes that build only: build_ext
        # writes this one's, and a pure-Python install has none
        return [m for m in super().find_package_modules(package, package_dir)
                if not (package == "gla_cuda" and m[1] == _build.INFO_MODULE)]

    def run(self):
        if CUDA_HOME is None:
            why = "GLA_CUDA_BUILD=0" if os.environ.get("GLA_CUDA_BUILD") == "0" else "no CUDA toolkit found"
            say(f"{why}: installing pure Python (Triton and reference backends only, "
                "no compiled CUDA kernels)")
        else:
            say(f"building the CUDA extension with the toolkit at {CUDA_HOME} (CUDA {CUDA_VERSION}) "
                f"against torch {TORCH[0]}")
        super().run()


CUDA_HOME = None if os.environ.get("GLA_CUDA_BUILD", "1") == "0" else find_cuda_home()
if CUDA_HOME is None:
    ext_modules, version = [], base_version()
else:
    CUDA_VERSION, TORCH = cuda_version(CUDA_HOME), running_torch()
    ext_modules = [CMakeExtension("gla_cuda._C")]
    version = f"{base_version()}+{_build.local_label(TORCH[0], CUDA_VERSION)}"
setup(version=version, ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy})
