"""The main job: `python -m gla_cuda` (or `gla-cuda`).

Prints what is installed and which backend runs what, checks every backend against the
float64 reference on fresh random inputs, then runs the one-minute benchmark
(`gla-bench --quick`: every backend side by side with fla and SDPA on a GPU; the
reference alone, said so, without one). `gla-bench` is the full sweep.
"""
from __future__ import annotations

import argparse
import sys

import torch

import gla_cuda
from gla_cuda import bench, dispatch


def _environment(device):
    from gla_cuda.backends import cuda, triton as tr
    print(f"gla_cuda {gla_cuda.__version__}, torch {torch.__version__}, device: "
          + (torch.cuda.get_device_name() if device == "cuda" else "CPU (no CUDA GPU)"))
    print(f"  compiled extension: {cuda.IMPORT_ERROR or 'built for ' + cuda._C.cuda_archs}")
    print(f"  triton: {tr.IMPORT_ERROR or 'importable'}")


def _check(device):
    """Every backend on both forms, against the float64 reference; returns the failures."""
    failures = []
    shape = (2, 100, 2, 32, 48)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, g = bench.make_inputs(*shape, device, dtype=dtype)
    print(f"\ncheck against the float64 reference, {shape} {str(dtype)[6:]}, "
          "relative errors of o, final state and gradients:")
    for form, fn in (("chunk", gla_cuda.chunk_gla), ("recurrent", gla_cuda.fused_recurrent_gla)):
        for name in dispatch.BACKENDS:
            why = dispatch.choose(f"{form}_fwd", q, k, v, g, backend=name).reasons[name]
            if why:
                print(f"  {form:<9} {name:<10} not available: {why}")
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
            ok = max(errs.values()) < (3e-2 if dtype == torch.bfloat16 else 1e-3)
            if not ok:
                failures.append(f"{form}/{name}")
            print(f"  {form:<9} {name:<10} {'ok  ' if ok else 'FAIL'} "
                  + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + ("" if grads else "  (no backward on this backend)"))
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
        print("\n== gla-bench --quick (about a minute; gla-bench runs the full sweep) ==", flush=True)
        bench.main(["--quick", "--out", args.out])
    if failures:
        print(f"\nFAILED: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
