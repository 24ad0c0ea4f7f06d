"""Train a small GLA language model on multi-query associative recall (MQAR).

Each sequence lists key-value pairs, then asks for the values of some keys again:

    k1 v1 k2 v2 ... kn vn | q1 a1 q2 a2 ...      (each q is one of the k, a its v)

The loss is only on predicting each answer a from its query q, so it measures recall, the
thing a fixed-size recurrent state finds hard and softmax attention finds easy.
It prints loss, answer accuracy and tokens/s as it trains, then times the same training step
(same model, same batches) with causal softmax attention (SDPA) for comparison;
--attn sdpa trains the softmax model instead (and times GLA's step).

    python examples/train_gla_lm.py --bf16              # GPU: d_model 256, seq 256, 400 steps
    python examples/train_gla_lm.py --attn sdpa --bf16
    python examples/train_gla_lm.py --tiny --device cpu # CPU: seconds
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    import gla_cuda
except ImportError:  # run from a checkout without installing: the repository root
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gla_cuda

IGNORE = -100


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def mqar_batch(batch, seq_len, vocab, num_kv, gen, device):
    """(inputs, labels) [batch, seq_len]; labels are IGNORE except at the query positions.

    Keys come from the lower half of the vocabulary and values from the upper half
    (token 0 unused), so a key is never mistaken for a value."""
    half = vocab // 2
    num_q = (seq_len - 2 * num_kv) // 2
    assert num_kv >= 1 and num_q >= 1, "seq_len must leave room for queries after the pairs"
    # distinct keys per sequence: a key with two values would be ambiguous
    keys = torch.rand(batch, half - 1, generator=gen).argsort(-1)[:, :num_kv] + 1
    values = torch.randint(half, vocab, (batch, num_kv), generator=gen)
    pick = torch.randint(0, num_kv, (batch, num_q), generator=gen)
    q, a = keys.gather(1, pick), values.gather(1, pick)
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    inputs[:, 0:2 * num_kv:2], inputs[:, 1:2 * num_kv:2] = keys, values
    start = 2 * num_kv
    inputs[:, start:start + 2 * num_q:2], inputs[:, start + 1:start + 2 * num_q:2] = q, a
    labels = torch.full_like(inputs, IGNORE)
    labels[:, start:start + 2 * num_q:2] = a  # at query q the model must output its value
    return inputs.to(device), labels.to(device)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with GatedLinearAttention's call signature."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).flatten(-2)), None


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Causal depthwise convolution over the last few tokens: lets each position see its
    neighbours directly (a key next to its value), as fla's GLA does with use_short_conv."""

    def __init__(self, d, width=4):
        super().__init__()
        self.conv = nn.Conv1d(d, d, width, groups=d, padding=width - 1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d, heads, attn, layer_idx, short_conv=False, gate_norm=16.0, cp_group=None):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.conv = ShortConv(d) if short_conv else nn.Identity()
        if attn == "gla":
            self.attn = gla_cuda.GatedLinearAttention(mode="chunk", hidden_size=d, num_heads=heads,
                                                      gate_logit_normalizer=gate_norm, layer_idx=layer_idx,
                                                      cp_group=cp_group)
        else:
            self.attn = SoftmaxAttention(d, heads)
        self.mlp = SwiGLU(d, 4 * d * 2 // 3)  # about 4d's parameters, as in Llama

    def forward(self, x):
        x = x + self.attn(self.conv(self.norm1(x)))[0]
        return x + self.mlp(self.norm2(x))


class LM(nn.Module):
    def __init__(self, vocab, d, layers, heads, attn, max_len, tied=True, short_conv=False, gate_norm=16.0,
                 cp_group=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        # Softmax attention without positions cannot tell its neighbours apart; GLA's decay
        # orders tokens by itself, so it gets no position embedding (as in fla's GLA models).
        self.pos = nn.Embedding(max_len, d) if attn == "sdpa" else None
        self.blocks = nn.ModuleList(Block(d, heads, attn, i, short_conv, gate_norm, cp_group)
                                    for i in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--num-kv", type=int, help="key-value pairs per sequence (default 4 tiny, 16 GPU)")
    p.add_argument("--vocab", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--attn", choices=("gla", "sdpa"), default="gla")
    p.add_argument("--lr", type=float)
    p.add_argument("--short-conv", action=argparse.BooleanOptionalAction, default=True,
                   help="a causal depthwise conv before each mixer (GLA needs it to learn MQAR quickly)")
    p.add_argument("--gate-norm", type=float, default=16.0,
                   help="GLA's gate_logit_normalizer: smaller lets the state forget faster")
    p.add_argument("--untied", action="store_true", help="a separate LM head, not the embedding")
    p.add_argument("--tiny", action="store_true", help="CPU-sized config (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--compare-steps", type=int,
                   help="then time this many steps of the same model with the other mixer (SDPA for GLA); "
                        "0: skip (default 10 tiny, 30 GPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on the CPU: 1)")
    args = p.parse_args(argv)
    # Unset options take the tiny or the GPU default.
    # softmax attention diverges at GLA's learning rate on the GPU config: each gets one that works
    # (unset --lr: 1e-2 for GLA, 3e-3 for SDPA, in train())
    tiny = dict(steps=60, batch=16, seq_len=32, vocab=64, d_model=64, layers=2, heads=2,
                log_every=10, compare_steps=10)
    full = dict(steps=400, batch=64, seq_len=256, vocab=8192, d_model=256, layers=2,
                heads=2, log_every=50, compare_steps=30)
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_kv is None:  # half the sequence for pairs at most: the rest holds the queries
        args.num_kv = min(4 if args.tiny else 16, max(1, args.seq_len // 4))
    return args


def build(args, attn, device):
    return LM(args.vocab, args.d_model, args.layers, args.heads, attn, args.seq_len, tied=not args.untied,
              short_conv=args.short_conv, gate_norm=args.gate_norm).to(device)


def train(args, attn, steps, device, log_every=None):
    """Trains a fresh model with mixer ``attn`` for ``steps`` steps on the seed's batches; returns
    {"losses", "accuracies", "step_ms"} (step_ms leaves out the first step: warm-up)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # data on the CPU: same batches on any device
    model = build(args, attn, device)
    lr = args.lr if args.lr is not None else (1e-2 if attn == "gla" else 3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    # linear warm-up, then cosine decay to a tenth
    decay = max(1, steps - warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / decay))))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    losses, accs, step_ms = [], [], []
    for step in range(1, steps + 1):
        inputs, labels = mqar_batch(args.batch, args.seq_len, args.vocab, args.num_kv, gen, device)
        sync()
        t0 = time.perf_counter()
        with amp:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        sync()
        dt = time.perf_counter() - t0
        if step > 1:  # the first step pays for warm-up (allocations, kernel compilation)
            step_ms.append(dt * 1e3)
        mask = labels != IGNORE
        acc = (logits.argmax(-1)[mask] == labels[mask]).float().mean().item()
        losses.append(loss.item())
        accs.append(acc)
        if log_every and (step % log_every == 0 or step == 1 or step == steps):
            print(f"step {step:5d}  loss {losses[-1]:.4f}  answer acc {acc:.3f}  "
                  f"{inputs.numel() / dt:,.0f} tok/s", flush=True)
    return {"losses": losses, "accuracies": accs, "step_ms": step_ms}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def main(argv=None):
    """Trains, prints progress and a summary, then times the same training step with the other
    mixer (--compare-steps). Returns {"losses", "final_loss", "accuracy", "tokens_per_s",
    "compare": {mixer: {"ms_per_step", "tokens_per_s"}}}."""
    args = parse_args(argv)
    if args.device == "cpu":  # small tensors: more threads mostly contend (and slow down a busy machine)
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_params = sum(p.numel() for p in build(args, args.attn, "meta").parameters())
    print(f"{args.attn} LM: {n_params / 1e6:.2f}M parameters, d_model {args.d_model}, {args.layers} layers, "
          f"{args.heads} heads | MQAR: seq {args.seq_len}, {args.num_kv} pairs, vocab {args.vocab}, "
          f"batch {args.batch} | {device}{', bf16' if args.bf16 else ''}", flush=True)
    # which kernels the GLA layers run here (gla_cuda.explain_backend says why)
    layer = gla_cuda.GatedLinearAttention(hidden_size=args.d_model, num_heads=args.heads)
    x = torch.empty(args.batch, args.seq_len, args.heads, layer.head_k_dim, device=device,
                    dtype=torch.bfloat16 if args.bf16 else torch.float32)
    y = x.new_empty(*x.shape[:3], layer.head_v_dim)
    fwd, bwd = (gla_cuda.explain_backend(x, x, y, x, op=op).backend for op in ("chunk_fwd", "chunk_bwd"))
    print(f"GLA runs chunk_fwd on {fwd}, chunk_bwd on {bwd}", flush=True)
    run = train(args, args.attn, args.steps, device, log_every=args.log_every)
    losses, accs = run["losses"], run["accuracies"]
    tokens = args.batch * args.seq_len
    # average the last few steps: one batch is noisy
    tail = max(1, min(10, len(losses) // 5))
    final_loss, accuracy = sum(losses[-tail:]) / tail, sum(accs[-tail:]) / tail
    ms = _median(run["step_ms"])
    tokens_per_s = tokens / ms * 1e3
    print(f"summary: {args.attn} final loss {final_loss:.4f} (first {losses[0]:.4f}), "
          f"answer accuracy {accuracy:.3f}, {ms:.1f} ms per step, {tokens_per_s:,.0f} tokens/s (median step)")
    compare = {args.attn: {"ms_per_step": ms, "tokens_per_s": tokens_per_s}}
    other = "sdpa" if args.attn == "gla" else "gla"
    if args.compare_steps > 1:
        # the same model, batches and step with the other mixer; timed, not trained to the end
        o = train(args, other, args.compare_steps, device)
        o_ms = _median(o["step_ms"])
        compare[other] = {"ms_per_step": o_ms, "tokens_per_s": tokens / o_ms * 1e3}
        print(f"same training step with {'SDPA causal softmax attention' if other == 'sdpa' else 'GLA'} "
              f"({args.compare_steps} steps, median):")
        for name, c in compare.items():
            print(f"  {name:<5} {c['ms_per_step']:8.1f} ms per step  {c['tokens_per_s']:>12,.0f} tokens/s")
        print(f"  gla / sdpa time: {compare['gla']['ms_per_step'] / compare['sdpa']['ms_per_step']:.2f}x")
    return {"losses": losses, "final_loss": final_loss, "accuracy": accuracy, "tokens_per_s": tokens_per_s,
            "compare": compare}


if __name__ == "__main__":
    main()
