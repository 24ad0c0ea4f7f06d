"""The benchmark: gla_cuda's backends side by side with fla and softmax attention.

    gla-bench                  # the sweep: T from 1K to 32K at 16K tokens per batch, for head dims
                               # 64, 128 and 256x512, bf16; then one decode step
    gla-bench --quick          # about a minute: one shape (8, 2048, 16, 128, 128), fwd, fwd+bwd, decode
    gla-bench --shapes 8,2048,16,128,128 2,8192,16,128,128 --modes fwd decode --dtypes bf16 fp16

Each backend is first checked against the float64 reference on a small case, per dtype
(o, final state and gradients; gates of -20 per step too); one that fails is not timed.
Then, per shape: forward, forward+backward and backward alone, as the median of
triton.testing.do_bench. The table gives ms, fla's time / ours and the best SDPA's time /
ours (> 1: faster), the fraction of the memory floor reached (the bytes that must move,
over the copy bandwidth measured in the same run), the peak memory allocated by the
call and (GPU) the host time per call, the mean of calls queued without syncing: "!" marks
a time the host needs 90% of or more, i.e. launch overhead rather than kernels. decode
times one recurrent step (T = 1) from a float32 state [B, H, K, V]; its floor is reading
and writing that state once plus q, k, v, g and o.

Candidates: ``auto`` (what a user gets), ``cuda``, ``triton``, ``reference`` (small sizes
only), ``fla`` when fla-core is importable, and SDPA flash / cuDNN (causal softmax
attention, same head dim). Without a GPU only the reference runs, on CPU-sized shapes.
Results go to --out (default ./bench_results): bench.json, bench.csv and PNG plots (time
vs T, one line per backend) when matplotlib is installed. A progress bar runs on stderr.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

from gla_cuda.bench import plots
from gla_cuda.bench.cases import (CPU_SHAPES, DECODE_SHAPES, DTYPES, HEAD_DIMS, MODES, QUICK_BUDGET_S, QUICK_MODES,
                                  QUICK_SHAPES, TOKENS, TRAIN_MODES, sweep_shapes)
from gla_cuda.bench.report import Progress, save
from gla_cuda.bench.runner import run
from gla_cuda.bench.timing import warm_parallel


def _shape(text):
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 5:
        raise argparse.ArgumentTypeError("a shape is B,T,H,K,V")
    return parts


def _decode_shape(text):
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("a decode shape is B,H,K,V")
    return parts


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gla-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"about a minute: {QUICK_SHAPES[0]}, modes {' '.join(QUICK_MODES)}, "
                        f"no measurement started after {QUICK_BUDGET_S} s")
    p.add_argument("--shapes", type=_shape, nargs="+", metavar="B,T,H,K,V", help="instead of the sweep")
    p.add_argument("--sweep", action="store_true", help="the sweep (the default without --shapes or --quick)")
    p.add_argument("--head-dims", nargs="+", choices=list(HEAD_DIMS), default=list(HEAD_DIMS),
                   help="the sweep's (H, K, V): 64 = (16, 64, 64), 128 = (16, 128, 128), 256x512 = (4, 256, 512)")
    p.add_argument("--tokens", type=int, default=TOKENS, help="the sweep's tokens per batch (B * T)")
    p.add_argument("--modes", nargs="+", choices=MODES, help=f"default: all; --quick: {' '.join(QUICK_MODES)}")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"], help="q, k, v, g dtypes")
    p.add_argument("--decode-shapes", type=_decode_shape, nargs="+", metavar="B,H,K,V", default=DECODE_SHAPES)
    p.add_argument("--out", default="bench_results", help="directory for bench.json, bench.csv and the plots")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                   help="PNG plots into --out (default: on when matplotlib is installed)")
    p.add_argument("--budget", type=float, help="seconds after which no measurement starts "
                   f"(--quick: {QUICK_BUDGET_S})")
    p.add_argument("--warm", action="store_true",
                   help="compile the kernels of every head dims in parallel processes first (fla compiles "
                        "many configs to autotune: minutes for a first run of the sweep)")
    p.add_argument("--warm-only", action="store_true", help="--warm, then stop")
    p.add_argument("--warm-timeout", type=float, help="seconds the warm-up may take (default: no limit)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--threads", type=int, help="torch CPU threads (CPU runs; default 1: the shapes are small)")
    return p.parse_args(argv)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    # Keep the timed process's autotuning results on disk: the next run skips fla's autotuning.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = args.modes or list(QUICK_MODES if args.quick else MODES)
    budget = args.budget if args.budget is not None else (QUICK_BUDGET_S if args.quick else None)
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
        shapes = args.shapes or CPU_SHAPES
        print("no CUDA GPU: timing only the PyTorch reference, on CPU-sized shapes "
              f"{', '.join(map(str, shapes))} (the GPU backends, fla and SDPA need a GPU)", flush=True)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        shapes = args.shapes or (QUICK_SHAPES if args.quick else sweep_shapes(args.head_dims, args.tokens))
    # stopped (timeout, kill): leave through the finally blocks (warm-up processes, the bar)
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _main(args, device, modes, budget, shapes, t_start)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args, device, modes, budget, shapes, t_start):
    decode_shapes = args.decode_shapes
    if (args.warm or args.warm_only) and device == "cuda":
        warm_parallel(shapes if any(m in TRAIN_MODES for m in modes) else [],
                      decode_shapes if "decode" in modes else [], args.dtypes, timeout_s=args.warm_timeout)
    if args.warm_only:
        return 0
    bar = Progress(1, enabled=args.progress)  # run() sets the total
    try:
        results = run(shapes, device, modes, args.out, dtypes=args.dtypes, decode_shapes=decode_shapes,
                      budget_s=budget, progress=bar)
    finally:
        bar.close()
    written = save(results, args.out) if args.out else []
    if args.out and args.plots is not False:
        try:
            written += plots.plot(results, args.out)
        except ImportError as e:
            if args.plots:  # asked for explicitly: fail; by default only say why there are none
                raise
            print(f"no plots: {e}")
    elif args.plots:
        print("--plots needs --out DIR")
    if written:
        print(f"\nwrote {', '.join(written)}")
    print(f"{time.perf_counter() - t_start:.0f} s in all" + (" (--quick)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
