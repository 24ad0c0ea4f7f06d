"""The main job: `python -m gla_cuda` (or `gla-cuda`).

Prints what is installed and which backend runs what, checks every backend that can run here
against the float64 reference on fresh random inputs, then runs the quick benchmark
(`gla-bench --quick`: on a GPU, about a minute, every backend side by side with fla and SDPA;
without one, seconds: the PyTorch reference alone, on a CPU-sized shape). `gla-bench` is the
full sweep.
"""
from __future__ import annotations

import argparse
import sys

import torch

import gla_cuda
from gla_cuda import bench, dispatch
from gla_cuda.testing import TOL, make_inputs


def _environment(device):
    from gla_cuda.backends import cuda, triton as tr
    print(f"gla_cuda {gla_cuda.__version__}, torch {torch.__version__}, device: "
          + (torch.cuda.get_device_name() if device == "cuda" else "CPU (no CUDA GPU)"))
    print(f"  compiled extension: {cuda.IMPORT_ERROR or 'built for ' + cuda._C.cuda_archs}")
    triton = tr.IMPORT_ERROR or "importable"
    if device == "cpu" and not tr.IMPORT_ERROR and not tr.interpreting():
        triton += " (its kernels run on a CUDA GPU; on CPU only under TRITON_INTERPRET=1, as the tests do)"
    print(f"  triton: {triton}")
    if device == "cpu":
        print("No CUDA GPU: the compiled and Triton backends need one, so here every op runs on the PyTorch "
              "reference. This checks what can run on CPU against the float64 reference and times the "
              "reference on a CPU-sized shape; run it on a GPU machine for the GPU backends.")


def _check(device):
    """Every backend that can run here, on both forms, against the float64 reference; returns
    the failures."""
    failures = []
    shape = (2, 100, 2, 32, 48)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ins = make_inputs(*shape, dtype=dtype, device=device, seed=0)
    q, k, v, g = (ins[n] for n in "qkvg")
    print(f"\ncheck against the float64 reference, {shape} {str(dtype)[6:]}, "
          "relative errors of o, final state and gradients:")
    for form, fn in (("chunk", gla_cuda.chunk_gla), ("recurrent", gla_cuda.fused_recurrent_gla)):
        absent = {}  # backend -> why it cannot run here
        for name in dispatch.BACKENDS:
            why = dispatch.choose(f"{form}_fwd", q, k, v, g, backend=name).reasons[name]
            if why:
                absent[name] = why
                continue

            def run(q, k, v, g, h0=None, final=False, _fn=fn, _name=name):
                return _fn(q, k, v, g, initial_state=h0, output_final_state=final, backend=_name)
            grads = dispatch.choose(f"{form}_bwd", q, k, v, g, backend=name).backend is not None
            try:
                errs = bench.accuracy(run, device, shape, grads=grads, dtype=dtype)
            except Exception as e:
                failures.append(f"{form}/{name}")
                print(f"  {form:<9} {name:<10} FAILED: {str(e).splitlines()[0][:200]}")
                continue
            ok = max(errs.values()) < TOL[dtype]
            if not ok:
                failures.append(f"{form}/{name}")
            print(f"  {form:<9} {name:<10} {'ok  ' if ok else 'FAIL'} "
                  + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + ("" if grads else "  (no backward on this backend)"))
        if absent and device == "cpu":
            print(f"  {form:<9} {', '.join(absent)}: not checked, they need a CUDA GPU (the tables above say why)")
        else:
            for name, why in absent.items():
                print(f"  {form:<9} {name:<10} not available: {why}")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--no-bench", action="store_true", help="skip the timings")
    p.add_argument("--out", default="bench_results", help="where the benchmark writes JSON, CSV and plots")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _environment(device)
    for op, T in (("chunk_fwd", 2048), ("chunk_bwd", 2048), ("recurrent_fwd", 1)):
        x = torch.empty(8, T, 16, 128, device=device, dtype=torch.bfloat16)
        print(gla_cuda.explain_backend(x, x, x, x, op=op))
    failures = _check(device)
    if not args.no_bench:
        what = ("about a minute" if device == "cuda" else
                "no GPU: the reference alone, on a CPU-sized shape, seconds")
        print(f"\n== gla-bench --quick ({what}; gla-bench runs the full sweep) ==", flush=True)
        bench.main(["--quick", "--out", args.out])
    if failures:
        print(f"\nFAILED: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
