"""The benchmark (``gla-bench``, ``python -m gla_cuda.bench``; cli.py says what it does).

Modules, each importing only those before it: cases (shapes, modes, candidates, memory
floors), report (the table, bench.json / bench.csv, the progress bar), accuracy (the gate
against the float64 reference), timing (do_bench, host time, CUDA graphs, the warm-up and
the checks in child processes), plots, runner (the driver) and cli (the command line).
"""
from gla_cuda.bench.accuracy import accuracy, decode_accuracy
from gla_cuda.bench.cases import (DECODE_CANDIDATES, DTYPES, MODES, QUICK_MODES, TOKENS, candidates,
                                  decode_candidates, floor_bytes, sweep_shapes)
from gla_cuda.bench.cli import main, parse_args
from gla_cuda.bench.report import Progress, save
from gla_cuda.bench.runner import run
from gla_cuda.bench.timing import child_check, time_candidate, time_decode, warm, warm_decode, warm_parallel

__all__ = ["DECODE_CANDIDATES", "DTYPES", "MODES", "QUICK_MODES", "TOKENS", "Progress", "accuracy", "candidates",
           "child_check", "decode_accuracy", "decode_candidates", "floor_bytes", "main", "parse_args", "run", "save",
           "sweep_shapes", "time_candidate", "time_decode", "warm", "warm_decode", "warm_parallel"]
