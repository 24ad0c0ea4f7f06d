"""examples/serve_gla.py runs on the CPU at a tiny size: continuous batching over one state
pool per layer, prefix reuse through a checkpoint, greedy outputs equal to generating alone."""
import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    path = os.path.join(ROOT, "examples", "serve_gla.py")
    spec = importlib.util.spec_from_file_location("serve_gla", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_serve_example_tiny_cpu(capsys):
    out = _load().main(["--device", "cpu", "--tiny", "--requests", "7", "--seed", "1"])
    assert out["finished"] == 7 and out["reused"] >= 1 and not out["graph"]
    assert "equals generating it alone" in capsys.readouterr().out


def test_serve_example_graph_gpu():
    if not torch.cuda.is_available():
        import pytest
        pytest.skip("CUDA graphs need a GPU")
    out = _load().main(["--device", "cuda", "--tiny", "--requests", "9"])
    assert out["finished"] == 9 and out["graph"]
