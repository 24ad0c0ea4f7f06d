"""The benchmark's driver: per dtype, the decode step, then per shape the accuracy gate (once
per head dims) and the timings of every candidate that passed."""
from __future__ import annotations

import time

import torch

import gla_cuda
from gla_cuda import dispatch
from gla_cuda.bench import cases
from gla_cuda.bench.accuracy import decode_gate, gate
from gla_cuda.bench.cases import (DECODE_SHAPES, DTYPES, MODES, REFERENCE_MAX_TOKENS, TIMING_RESERVE_S,
                                  TRAIN_MODES, accuracy_shape, dtype_name, floor_bytes, head_dim_groups,
                                  usable_modes)
from gla_cuda.bench.report import HEADER, Progress, first_line, row_line, save
from gla_cuda.bench.timing import child_result, copy_bandwidth, start_child_check, time_candidate, time_decode


def run(shapes, device, modes=MODES, out_dir=None, log=None, dtypes=("bf16",), decode_shapes=None,
        budget_s=None, progress=None, isolate=None):
    """Checks, then times every candidate; returns the results dict (also saved to out_dir
    after every shape, so a run cut short keeps what it measured). budget_s: no measurement
    starts after that many seconds (those left are listed as skipped). isolate: candidates
    whose check runs in a child process killed when the budget runs out (default with a
    budget: fla, whose first run compiles for minutes)."""
    if isolate is None:
        isolate = ("fla",) if budget_s is not None else ()
    t_start = time.perf_counter()
    dtypes = [d if isinstance(d, str) else dtype_name(d) for d in dtypes]
    train_modes = [m for m in modes if m in TRAIN_MODES]
    decode_shapes = (DECODE_SHAPES if decode_shapes is None else decode_shapes) if "decode" in modes else []
    shapes = shapes if train_modes else []
    cands = cases.candidates(device) if shapes else {}
    dcands = cases.decode_candidates(device) if decode_shapes else {}
    groups = head_dim_groups(shapes)
    total = len(dtypes) * (len(cands) * (len(groups) + len(shapes)) + len(dcands) * 2 * len(decode_shapes))
    bar = progress or Progress(total, enabled=False)
    bar.total = max(1, total)
    log = log or bar.write
    versions = {"torch": torch.__version__, "gla_cuda": gla_cuda.__version__}
    for mod in ("triton", "fla"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "versions": versions, "rows": [], "accuracy": [],
               "skipped": [], "torch": torch.__version__}
    bw = copy_bandwidth(device) if device == "cuda" else None
    results["copy_bandwidth_GBps"] = bw and bw / 1e9
    if bw:
        log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write): the memory floor's speed")

    def over_budget(what):
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            results["skipped"].append(what)
            return True
        return False

    for dname in dtypes:
        dtype = DTYPES[dname]
        # decode first: it takes seconds, so a time budget never cuts it
        _decode(dcands, decode_shapes, device, dtype, dname, results, log, bar, over_budget)
        usable_by = {}  # (H, K, V) -> {name: fn} of the candidates that passed there
        for shape in shapes:
            if tuple(shape[2:]) not in usable_by:  # the first shape of its head dims: check first
                usable_by[tuple(shape[2:])] = _check(
                    cands, device, dtype, dname, results, log, bar, over_budget, accuracy_shape(shape),
                    groups[tuple(shape[2:])], isolate,
                    lambda: 3600.0 if budget_s is None else
                    budget_s - TIMING_RESERVE_S - (time.perf_counter() - t_start), grads=train_modes != ["fwd"])
            usable = usable_by[tuple(shape[2:])]
            t0 = time.perf_counter()
            B, T, H, K, V = shape
            floors = "; ".join(f"{m} {floor_bytes(*shape, m, dtype.itemsize) / bw * 1e3:.3f} ms"
                               for m in train_modes) if bw else "no GPU: no floor"
            log(f"\n(B, T, H, K, V) = {tuple(shape)}, {dname}; memory floor {floors}")
            log(HEADER)
            for name in cands:
                bar.start(f"{shape} {dname} {name}")
                if name not in usable or (name.startswith("sdpa") and K != V) or \
                        (name == "reference" and device == "cuda" and B * T * H > REFERENCE_MAX_TOKENS) or \
                        over_budget(f"{name} {shape} {dname}"):
                    bar.advance()
                    continue
                t1 = time.perf_counter()
                try:
                    times, peak, host = time_candidate(usable[name], shape, device,
                                                       usable_modes(name, device, train_modes), dtype)
                except Exception as e:
                    log(f"{name:<11} failed: {first_line(e)}")
                    bar.advance()
                    continue
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                row = {"shape": list(shape), "dtype": dname, "backend": name, "ms": times, "peak_bytes": peak,
                       "host_ms": host, "seconds": time.perf_counter() - t1}
                results["rows"].append(row)
                for mode in times:
                    log(row_line(results, row, mode))
                bar.advance()
            if device == "cuda":
                x = torch.empty(B, T, H, K, device=device, dtype=dtype)
                picks = {op: dispatch.choose(op, x, x, x, x).backend for op in ("chunk_fwd", "chunk_bwd")}
                saver = dispatch.saving_backend(x, x, x, x)
                del x
                train = (f"the {saver} forward keeping its intermediates for the backward" if saver
                         else f"chunk_fwd on {picks['chunk_fwd']}")
                log(f"auto ran chunk_fwd on {picks['chunk_fwd']}, chunk_bwd on {picks['chunk_bwd']}; "
                    f"fwd+bwd (training) ran {train}; {time.perf_counter() - t0:.0f} s for this shape")
            if out_dir:
                save(results, out_dir)
        if out_dir:
            save(results, out_dir)
    if results["skipped"]:
        log(f"\n{len(results['skipped'])} measurements not started: the time budget ({budget_s} s) ran out "
            f"(run without --quick for all): " + ", ".join(results["skipped"][:6])
            + (" ..." if len(results["skipped"]) > 6 else ""))
    results["seconds"] = time.perf_counter() - t_start
    return results


def _check(cands, device, dtype, dname, results, log, bar, over_budget, shape, timed_shapes=(), isolate=(),
           time_left=None, grads=True):
    """The accuracy gate at shape (accuracy.gate). Candidates in ``isolate`` are checked (and
    their timed shapes compiled) in a child process started first, so it compiles while the
    others are checked, and collected last: it is killed once time_left() runs out."""
    started = time.perf_counter()
    children = {name: start_child_check(name, shape, timed_shapes, dname, grads) for name in isolate
                if cands.get(name, (None,))[0] is not None and not over_budget(f"accuracy {name} {dname}")}
    collect = {name: (lambda name=name: child_result(children.pop(name), max(1.0, time_left()), started))
               for name in children}
    try:
        return gate(cands, device, dtype, dname, results, log, bar, over_budget, shape, collect, grads)
    finally:
        for proc in children.values():  # any left: the others failed in between
            proc.kill()
            proc.communicate()


def _decode(dcands, decode_shapes, device, dtype, dname, results, log, bar, over_budget):
    """Per decode shape: the gate, then the timings of those that passed."""
    bw = results["copy_bandwidth_GBps"]
    for B, H, K, V in decode_shapes or ():
        usable = decode_gate(dcands, (min(B, 8), H, K, V), device, dtype, dname, results, log, bar, over_budget)
        shape = (B, 1, H, K, V)
        floor = floor_bytes(*shape, "decode", dtype.itemsize)
        state = B * H * K * V * 4
        log(f"\ndecode step (B, H, K, V) = {(B, H, K, V)}, {dname}, float32 state of "
            + (f"{state / 2**20:.0f} MiB" if state >= 2**20 else f"{state / 2**10:.0f} KiB")
            + " read and written; memory floor " + (f"{floor / (bw * 1e9) * 1e3:.4f} ms" if bw else "— (no GPU)"))
        log(HEADER)
        for name, fn in dcands.items():
            bar.start(f"decode {(B, H, K, V)} {dname} {name}")
            if name in usable and not over_budget(f"decode {name} {(B, H, K, V)} {dname}"):
                try:
                    ms, peak = time_decode(fn, (B, H, K, V), device, dtype)
                except Exception as e:
                    log(f"{name:<11} failed: {first_line(e)}")
                else:
                    row = {"shape": list(shape), "dtype": dname, "backend": name, "ms": ms,
                           "peak_bytes": {"decode": peak}, "seconds": None}
                    results["rows"].append(row)
                    for mode in ms:
                        log(row_line(results, row, mode))
            bar.advance()
