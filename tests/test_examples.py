"""The training example and the benchmark (gla-bench) run end to end on the CPU, in seconds:
--quick, the decode mode, the accuracy gate, JSON/CSV output, plots and the progress bar."""
import csv
import importlib.util
import io
import json
import math
import os
import time

import pytest
import torch

import gla_cuda
from gla_cuda import bench
from gla_cuda.bench import cases, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _load_example():
    # examples/ is not a package: load the script by path
    path = os.path.join(ROOT, "examples", "train_gla_lm.py")
    spec = importlib.util.spec_from_file_location("train_gla_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_example_loss_falls(capsys):
    example = _load_example()
    out = example.main(["--tiny", "--device", "cpu", "--steps", "20", "--batch", "8", "--seq-len", "16",
                        "--num-kv", "2", "--vocab", "16", "--d-model", "32", "--layers", "1",
                        "--log-every", "100", "--compare-steps", "3"])
    losses = out["losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # mean of the first vs the last steps: single batches are noisy
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    # the same step with SDPA attention, timed for comparison
    assert set(out["compare"]) == {"gla", "sdpa"}
    assert all(c["tokens_per_s"] > 0 for c in out["compare"].values())
    text = capsys.readouterr().out
    assert "tokens/s" in text and "SDPA" in text


def _read(out_dir):
    with open(os.path.join(out_dir, "bench.json")) as f:
        results = json.load(f)
    with open(os.path.join(out_dir, "bench.csv")) as f:
        rows = list(csv.DictReader(f))
    return results, rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the path without a GPU")
def test_bench_quick_cpu(tmp_path, capsys, monkeypatch):
    """--quick without a GPU: the reference, said so; every quick mode; JSON, CSV, a plot."""
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")  # main() sets a default; keep this process clean
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "no CUDA GPU" in text and "reference" in text
    results, rows = _read(tmp_path)
    checks = {(a["op"], a["backend"]): a for a in results["accuracy"]}
    assert checks["chunk", "reference"]["ok"] and checks["chunk", "reference"]["errors"]["o"] < 1e-2
    assert checks["decode", "reference"]["ok"]
    assert {(r["backend"], r["mode"]) for r in rows} == {("reference", m) for m in bench.QUICK_MODES}
    assert all(float(r["ms"]) > 0 for r in rows)
    decode = next(r for r in rows if r["mode"] == "decode")
    assert (decode["B"], decode["T"], decode["H"], decode["K"], decode["V"]) == ("64", "1", "16", "128", "128")
    pngs = [n for n in os.listdir(tmp_path) if n.endswith(".png")]
    if HAS_MPL:
        assert len(pngs) == 1
    else:
        assert not pngs and "no plots" in text


def test_bench_decode_refuses_a_wrong_candidate(tmp_path, monkeypatch):
    """decode mode alone; a candidate whose state is wrong is checked, reported and not timed."""
    ref = bench.DECODE_CANDIDATES["reference"]

    def wrong(q, k, v, g, h, i):
        o, ht = ref(q, k, v, g, h, i)
        return o, ht * 1.5
    monkeypatch.setattr(cases, "decode_candidates", lambda device: {"reference": ref, "wrong": wrong})
    results = bench.run([], "cpu", modes=["decode"], out_dir=str(tmp_path), decode_shapes=[(4, 2, 64, 32)],
                        log=lambda *a: None)
    assert [(r["backend"], r["shape"]) for r in results["rows"]] == [("reference", [4, 1, 2, 64, 32])]
    acc = {a["backend"]: a for a in results["accuracy"]}
    assert acc["reference"]["ok"] and acc["reference"]["errors"]["ht"] < 1e-3
    assert not acc["wrong"]["ok"] and acc["wrong"]["errors"]["ht"] > 0.1
    assert acc["wrong"]["shape"] == [4, 2, 64, 32] and acc["wrong"]["op"] == "decode"
    _, rows = _read(tmp_path)
    assert [r["mode"] for r in rows] == ["decode"]


def test_bench_refuses_a_wrong_backend(monkeypatch):
    ref = cases._ours("reference")

    def wrong(q, k, v, g, h0=None, final=False):
        o, ht = ref(q, k, v, g, h0, final)
        return o * 1.1, ht
    monkeypatch.setattr(cases, "candidates", lambda device: {"reference": (ref, None), "wrong": (wrong, None),
                                                            "absent": (None, "not installed")})
    lines = []
    results = bench.run([(1, 64, 1, 32, 32)], "cpu", modes=["fwd"], log=lines.append)
    assert [r["backend"] for r in results["rows"]] == ["reference"]
    assert any("wrong" in l and "FAILS, not timed" in l for l in lines)
    assert any("absent" in l and "not installed" in l for l in lines)


@pytest.mark.skipif(not hasattr(gla_cuda, "fused_recurrent_gla_pooled"), reason="no pooled decode op yet")
def test_pooled_decode_candidate():
    errs = bench.decode_accuracy(cases._decode_pooled("reference"), "cpu", B=3, H=2, K=32, V=16)
    assert max(errs.values()) < 5e-2


def test_floor_and_sweep():
    # docs/design.md, 'The roofline': a decode step at B 64, H 16, 128x128 moves ~134 MB: 0.044 ms at 3.0 TB/s
    assert abs(bench.floor_bytes(64, 1, 16, 128, 128, "decode") / 3.0e12 * 1e3 - 0.0447) < 1e-3
    assert abs(bench.floor_bytes(8, 2048, 16, 128, 128, "fwd") / 3.0e12 * 1e3 - 0.111) < 2e-3
    shapes = bench.sweep_shapes(["128"])
    assert [s[1] for s in shapes] == [1024, 2048, 4096, 8192, 16384, 32768]
    assert all(B * T == bench.TOKENS for B, T, *_ in shapes[:-1]) and shapes[-1][0] == 1


def test_progress_bar():
    stream = io.StringIO()
    bar = bench.Progress(4, enabled=True, stream=stream, width=8)
    bar.start("fla fwd")
    bar.advance(2)
    text = stream.getvalue()
    assert "[####....] 2/4" in text and "fla fwd" in text and "left" in text
    bar.close()
    assert stream.getvalue().endswith("\r")
    quiet = io.StringIO()
    bench.Progress(4, stream=quiet).advance()  # not a terminal: draws nothing
    assert quiet.getvalue() == ""


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (pip install matplotlib)")
def test_plots_written(tmp_path):
    from gla_cuda.bench import plots

    rows = [{"shape": (16384 // T, T, 2, 64, 64), "dtype": "bf16", "backend": name,
             "ms": {"fwd": ms, "fwdbwd": 3 * ms}}
            for T in (1024, 2048, 4096) for name, ms in (("cuda", 1.0), ("sdpa_cudnn", T / 1000))]
    rows.append({"shape": (1, 256, 2, 64, 64), "dtype": "bf16", "backend": "reference",
                 "ms": {"fwd": 5.0}})  # a single T: bar charts
    rows.append({"shape": (64, 1, 16, 128, 128), "dtype": "bf16", "backend": "fla",
                 "ms": {"decode": 0.1}})  # decode: not plotted
    results = {"device": "test GPU", "date": "2026-01-01", "rows": rows, "copy_bandwidth_GBps": 3000.0}
    paths = plots.plot(results, str(tmp_path))
    assert len(paths) == 2  # the sweep (forward and forward+backward panels) and the single shape
    for p in paths:
        assert p.endswith(".png") and os.path.getsize(p) > 0
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_check_in_a_child_process():
    """With a time budget a slow-to-compile candidate (fla) is checked in a child process that
    is killed when the budget runs out; here the reference stands in for it."""
    lines = []
    results = bench.run([(1, 64, 1, 32, 32)], "cpu", modes=["fwd"], log=lines.append, budget_s=120,
                        isolate=("reference",))
    assert [r["backend"] for r in results["rows"]] == ["reference"]
    assert results["accuracy"][0]["ok"]
    with pytest.raises(TimeoutError, match="still compiling"):
        timing.child_result(timing.start_child_check("reference", (1, 64, 1, 32, 32), [], "bf16"), 0.01,
                            time.perf_counter())
