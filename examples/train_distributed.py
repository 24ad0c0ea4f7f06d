"""Train a small GLA language model on several processes: FSDP2 (parameters, gradients and
optimizer state sharded over the ranks) and, with --cp, context parallelism (every sequence
split across the ranks, gla_cuda.distributed.chunk_gla inside each GatedLinearAttention).

    torchrun --nproc-per-node 2 examples/train_distributed.py --cp           # GPUs, NCCL
    torchrun --nproc-per-node 2 examples/train_distributed.py --device cpu --cp --tiny  # CPU, gloo
    python examples/train_distributed.py --device cpu --tiny                 # one process

Without --cp the ranks split the batch (data parallel); with --cp they all read the same batch
and each takes a contiguous slice of every sequence. The model (GatedLinearAttention + SwiGLU
blocks, pre-norm) has no position embedding and no short convolution, so nothing but the GLA
layers mixes tokens and a slice needs nothing from its neighbours but the recurrent state.
The loss is the mean over all tokens of the global batch, whatever the split, so a run on
any number of processes follows the one-process run (--out writes its losses as JSON).
"""
from __future__ import annotations

import os

# NVLink multicast (NVLS) stays off in every process this script starts: set before
# torch.distributed (and NCCL) initialise.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gla_lm import LM  # noqa: E402  (the model of the single-process example; it imports gla_cuda)


def batch(step, args):
    """The global batch of a step (the same on every rank): a noisy copy task, each token
    repeating the one `lag` places back, so the model must carry information across the
    sequence (and, with --cp, across slices). Random tokens elsewhere keep the loss from
    collapsing in a few steps."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + step)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
    lag = 3
    copy = torch.rand(args.batch, args.seq_len + 1, generator=gen) < 0.7
    tokens[:, lag:] = torch.where(copy[:, lag:], tokens[:, :-lag], tokens[:, lag:])
    return tokens[:, :-1], tokens[:, 1:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cp", action="store_true", help="split every sequence across the ranks")
    p.add_argument("--no-fsdp", action="store_true", help="replicate the model (gradients all-reduced by hand)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU-sized run: 4 steps, batch 4, seq 64, d 32")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", help="write {'losses': [...]} here (rank 0)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.seq_len, args.vocab = 4, 4, 64, 32
        args.d_model, args.layers, args.heads, args.log_every = 32, 2, 2, 1
    return args


def setup(device_type):
    """(rank, world size, device); initialises torch.distributed when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_type)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    rank, world, device = setup(args.device)
    if args.batch % world and not args.cp:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} processes (or use --cp)")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    cp_group = dist.group.WORLD if args.cp and world > 1 else None
    # train_gla_lm's GLA model, untied (FSDP2 shards the embedding and the head apart), no short
    # convolution and no position embedding: only the GLA layers mix tokens
    model = LM(args.vocab, args.d_model, args.layers, args.heads, "gla", args.seq_len, tied=False,
               cp_group=cp_group).to(device)
    if world > 1 and not args.no_fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        shard = "FSDP2" if world > 1 and not args.no_fsdp else "replicated"
        print(f"GLA LM {n / 1e6:.2f}M parameters ({shard} over {world}), {'CP' if cp_group else 'data parallel'}; "
              f"batch {args.batch} x {args.seq_len} tokens on {device}", flush=True)

    losses = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        inputs, labels = batch(step, args)
        if world > 1 and args.cp:  # every rank: all rows, its slice of the sequence
            bounds = [args.seq_len * r // world for r in range(world + 1)]
            lo, hi = bounds[rank], bounds[rank + 1]
            inputs, labels = inputs[:, lo:hi], labels[:, lo:hi]
        elif world > 1:            # every rank: its rows
            rows = args.batch // world
            inputs, labels = inputs[rank * rows:(rank + 1) * rows], labels[rank * rows:(rank + 1) * rows]
        inputs, labels = inputs.to(device), labels.to(device)
        with amp:
            logits = model(inputs)
        # this rank's share of the global mean: summed over the ranks it is the loss
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        loss = loss / (args.batch * args.seq_len)
        opt.zero_grad(set_to_none=True)
        # FSDP averages the ranks' gradients; the loss is their sum, so each rank's counts W times
        (loss * world if world > 1 else loss).backward()
        if world > 1 and args.no_fsdp:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        total = loss.detach()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item())
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            ms = (time.perf_counter() - t0) * 1e3
            print(f"step {step:4d}  loss {losses[-1]:.5f}  {ms:7.1f} ms", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "world_size": world, "cp": bool(cp_group)}, f)
    if world > 1:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
