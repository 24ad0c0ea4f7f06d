"""Prefill and decode speed of an fla GLAForCausalLM against the same model converted to
gla_cuda's kernels (gla_cuda.integrations.fla.use_gla_cuda), side by side.

    python tools/bench_fla_model.py                       # 340M configuration, bf16, on the GPU
    python tools/bench_fla_model.py --batch 8 --prompt 4096 --short-conv
    python tools/bench_fla_model.py --device cpu --tiny   # a smoke run without a GPU

The model is fla's GLA 340M configuration (hidden 1024, 24 layers, 4 heads, vocabulary 32000,
tied embeddings) with random weights; --short-conv adds fla's short convolution. Both models
share the weights (the converted one is a deep copy). Timed, per model:

  prefill   one forward over the prompt [batch, prompt] with use_cache (the states are built),
            logits of the last position only (logits_to_keep=1);
  decode    one token per row from a prefilled cache: forward of [batch, 1] with use_cache;
  generate  (--generate N) greedy generate() of N new tokens, wall clock, once after a warm-up;
            the two models' generated tokens are compared.

GPU times are triton.testing.do_bench medians; on the CPU (--device cpu, a smoke run for
correctness of the script, with fla's Triton kernels in the interpreter) a median of wall
clock runs. Before timing, the two models' last-position logits are compared (relative error).
Needs flash-linear-attention (fla-core) and transformers.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--tiny", action="store_true", help="a tiny configuration (hidden 64, 2 layers)")
    p.add_argument("--short-conv", action="store_true", help="use_short_conv=True in the configuration")
    p.add_argument("--batch", type=int, default=None, help="default 4 (1 with --tiny)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length; default 2048 (16 with --tiny)")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also time generate() of N tokens")
    p.add_argument("--backend", default=None, help="gla_cuda backend (default: $GLA_BACKEND or auto)")
    p.add_argument("--rep", type=int, default=None, help="do_bench rep in ms (GPU) / runs (CPU)")
    args = p.parse_args(argv)
    args.batch = args.batch or (1 if args.tiny else 4)
    args.prompt = args.prompt or (16 if args.tiny else 2048)
    args.rep = args.rep or (3 if args.device == "cpu" else 200)
    for name in ("batch", "prompt", "rep"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.generate < 0:
        p.error("--generate must be >= 0")
    return args


def config_kwargs(tiny: bool, short_conv: bool) -> dict:
    if tiny:
        kw = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=97, hidden_ratio=2)
    else:  # fla's GLA 340M configuration
        kw = dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, vocab_size=32000, hidden_ratio=4,
                  expand_k=0.5, expand_v=1, attn_mode="chunk", norm_eps=1e-6, tie_word_embeddings=True)
    return dict(kw, use_short_conv=short_conv, fuse_cross_entropy=False, use_cache=True)


def make_timer(device: str, rep: int):
    """fn -> milliseconds: do_bench's median on the GPU, a median of wall clock runs on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=max(rep // 4, 10), rep=rep, return_mode="median")

    def timer(fn):
        fn()
        runs = []
        for _ in range(rep):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)
    return timer


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # fla's kernels are Triton only: on the CPU they run in the interpreter, which has to be
        # chosen before Triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, ROOT)
    import torch
    try:
        from fla.models import GLAConfig, GLAForCausalLM
        from fla.models.utils import Cache
    except ImportError as e:
        print(f"needs flash-linear-attention and transformers: {e}", file=sys.stderr)
        return 2
    from gla_cuda.integrations.fla import use_gla_cuda

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    if args.device == "cpu":
        # The interpreter runs one configuration per autotuned kernel: timing them needs a GPU.
        from triton.runtime import autotuner
        prune = autotuner.Autotuner.prune_configs
        autotuner.Autotuner.prune_configs = lambda self, kw: prune(self, kw)[:1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device(args.device)

    torch.manual_seed(0)
    config = GLAConfig(**config_kwargs(args.tiny, args.short_conv))
    fla_model = GLAForCausalLM(config).to(dev, dtype).eval()
    ours = use_gla_cuda(copy.deepcopy(fla_model), backend=args.backend)
    params = sum(p.numel() for p in fla_model.parameters())
    B, T = args.batch, args.prompt
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (B, T), generator=gen).to(dev)
    token = torch.randint(3, config.vocab_size, (B, 1), generator=gen).to(dev)
    models = {"fla": fla_model, "gla_cuda": ours}

    def prefill(model):
        return model(input_ids=ids, past_key_values=Cache(), use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        logits = {name: prefill(m).logits.float() for name, m in models.items()}
    err = ((logits["gla_cuda"] - logits["fla"]).norm() / logits["fla"].norm()).item()
    print(f"GLAForCausalLM {'tiny' if args.tiny else '340M'} ({params / 1e6:.1f}M parameters"
          f"{', short conv' if args.short_conv else ''}), {args.dtype}, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; "
          f"batch {B}, prompt {T}")
    print(f"last-position logits, gla_cuda vs fla: relative error {err:.2e}")

    timer = make_timer(args.device, args.rep)
    rows = []
    with torch.no_grad():
        times = {name: timer(lambda m=m: prefill(m)) for name, m in models.items()}
        rows.append(("prefill", times, B * T))
        times = {}
        for name, m in models.items():
            cache = prefill(m).past_key_values
            # Each call advances the same cache by one token: a GLA step costs the same at any position.
            times[name] = timer(lambda m=m, cache=cache: m(input_ids=token, past_key_values=cache,
                                                           use_cache=True))
        rows.append(("decode step", times, B))
        if args.generate:
            times, tokens = {}, {}
            for name, m in models.items():
                run = lambda m=m: m.generate(ids, max_new_tokens=args.generate, min_new_tokens=args.generate,
                                             do_sample=False, pad_token_id=0)
                tokens[name] = run()[:, T:]
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name] = (time.perf_counter() - start) * 1e3
            rows.append((f"generate {args.generate}", times, B * args.generate))
            diff = tokens["fla"] != tokens["gla_cuda"]
            first = [int(r.nonzero()[0]) if r.any() else None for r in diff]
            print(f"greedy tokens of generate({args.generate}): {'DIFFER' if diff.any() else 'equal'} "
                  f"({int((~diff).sum())} of {diff.numel()} equal"
                  + (f"; first difference per row: {first}" if diff.any() else "") + ")")

    print(f"\n{'phase':<14}{'fla ms':>12}{'gla_cuda ms':>14}{'speedup':>10}{'fla tok/s':>14}{'gla_cuda tok/s':>16}")
    for phase, times, tokens in rows:
        a, b = times["fla"], times["gla_cuda"]
        print(f"{phase:<14}{a:>12.3f}{b:>14.3f}{a / b:>9.2f}x{tokens / a * 1e3:>14.0f}{tokens / b * 1e3:>16.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
