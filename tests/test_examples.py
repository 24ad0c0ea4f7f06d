"""The training example and the benchmark plots run end to end (CPU, seconds)."""
import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    # examples/ is not a package: load the script by path
    path = os.path.join(ROOT, "examples", "train_gla_lm.py")
    spec = importlib.util.spec_from_file_location("train_gla_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_example_loss_falls():
    example = _load_example()
    out = example.main(["--tiny", "--device", "cpu", "--steps", "20", "--batch", "8", "--seq-len", "16",
                        "--num-kv", "2", "--vocab", "16", "--d-model", "32", "--layers", "1",
                        "--log-every", "100"])
    losses = out["losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # mean of the first vs the last steps: single batches are noisy
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    from gla_cuda import plots

    rows = [{"shape": (16384 // T, T, 2, 64, 64), "backend": name, "ms": {"fwd": ms, "fwdbwd": 3 * ms},
             "peak_bytes": None, "seconds": 0.1}
            for T in (1024, 2048, 4096) for name, ms in (("cuda", 1.0), ("sdpa_cudnn", T / 1000))]
    rows.append({"shape": (1, 256, 2, 64, 64), "backend": "reference", "ms": {"fwd": 5.0},
                 "peak_bytes": None, "seconds": 0.1})  # a single T: a bar chart
    results = {"device": "test GPU", "date": "2026-01-01", "rows": rows}
    paths = plots.plot(results, str(tmp_path))
    assert len(paths) == 3  # sweep: fwd and fwdbwd; single shape: fwd only
    for p in paths:
        assert p.endswith(".png") and os.path.getsize(p) > 0
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
