"""Context-parallel GLA over several GPUs: forward+backward time per step of
gla_cuda.distributed.chunk_gla, the share of it the collectives take, and the weak-scaling
efficiency against one GPU doing the same per-GPU work alone; checks the CP result against
the one-GPU result on the whole sequence where that fits.

    torchrun --nproc-per-node 8 tools/bench_distributed.py                 # 128K, 512K, 1M tokens
    torchrun --nproc-per-node 8 tools/bench_distributed.py --tokens 1048576 --json out.json
    torchrun --nproc-per-node 2 tools/bench_distributed.py --device cpu --tokens 4096 --heads 2 --iters 1

One sequence (B = 1) of --tokens tokens split evenly across the ranks; H 16, K = V = 128,
bfloat16 q, k, v and a float32 gate by default. Per step, for each ranks' slice:
  cp ms      forward+backward of the CP call, the slowest rank (max over ranks)
  local ms   the same on the slice alone with gla_cuda.chunk_gla (no communication): what one
             GPU takes for the same per-GPU work
  comm ms    the step's collectives alone (the forward all-gather and the backward
             reduce-scatter of the same buffers), timed back to back
  efficiency local / cp (weak scaling: 1.0 is perfect)
The check compares o and every gradient of the CP call on --check-tokens tokens (default the
smallest --tokens, at most 131072) with one rank's gla_cuda.chunk_gla on the whole sequence.
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")                # NVLink multicast stays off
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

try:
    import gla_cuda
except ImportError:  # run from a checkout: the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gla_cuda
from gla_cuda import distributed as gla_dist  # noqa: E402

# the tensor collectives' newer names differ between torch versions; the old ones still work
warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[131072, 524288, 1048576])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--v", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-tokens", type=int, help="tokens of the correctness check (0: none)")
    p.add_argument("--backend", default=None, help="gla_cuda backend (default auto)")
    p.add_argument("--json", help="write the rows here (rank 0)")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.dtype == "bf16":
        args.dtype = "fp32"  # the CPU reference runs float32
    if args.check_tokens is None:
        args.check_tokens = min(min(args.tokens), 131072)
    return args


def setup(device_type):
    if "RANK" not in os.environ:  # one process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    torch.set_num_threads(1)
    return rank, dist.get_world_size(), torch.device("cpu")


def inputs(T, args, device, seed, requires_grad=True):
    """q, k, v, g [1, T, H, *] and do, the same on every rank for the same seed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[args.dtype]
    H, K, V = args.heads, args.k, args.v

    def r(*shape):
        return torch.randn(*shape, generator=gen, device=device)
    q, k, v = r(1, T, H, K).to(dt), r(1, T, H, K).to(dt), r(1, T, H, V).to(dt)
    g = torch.nn.functional.logsigmoid(r(1, T, H, K)) / 16
    do = r(1, T, H, V).to(dt)
    ins = [x.requires_grad_(requires_grad) for x in (q, k, v, g)]
    return ins, do


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, args, device):
    """Median ms per call over --iters (after --warmup), the slowest rank's."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor(sorted(times)[len(times) // 2], dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms)


def bench(T, args, rank, W, device):
    bounds = [T * r // W for r in range(W + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    (q, k, v, g), do = inputs(hi - lo, args, device, seed=1000 + rank)

    def cp_step():
        o, _ = gla_dist.chunk_gla(q, k, v, g, backend=args.backend)
        o.backward(do)
        for x in (q, k, v, g):
            x.grad = None

    def local_step():
        o, _ = gla_cuda.chunk_gla(q, k, v, g, backend=args.backend)
        o.backward(do)
        for x in (q, k, v, g):
            x.grad = None

    # the step's collectives, alone: the all-gather of (state, decay) and its backward's reduce-scatter
    H, K, V = args.heads, args.k, args.v
    block = torch.zeros(H * K * (V + 1), device=device)
    full = torch.zeros(W * block.numel(), device=device)

    def comm_step():
        dist.all_gather_into_tensor(full, block)
        dist.reduce_scatter_tensor(block, full)

    row = {"tokens": T, "world_size": W, "tokens_per_gpu": hi - lo, "heads": H, "k": K, "v": V,
           "dtype": args.dtype, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    row["cp_ms"] = timed(cp_step, args, device)
    row["local_ms"] = timed(local_step, args, device)
    row["comm_ms"] = timed(comm_step, args, device) if W > 1 else 0.0
    row["comm_share"] = row["comm_ms"] / row["cp_ms"]
    row["efficiency"] = row["local_ms"] / row["cp_ms"]
    bytes_ = gla_dist.communication_bytes(W, H, K, V, pieces=1, offsets=False)
    row["comm_bytes_per_rank"] = bytes_["total"]
    return row


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(T, args, rank, W, device):
    """The CP call against gla_cuda.chunk_gla on the whole sequence (every rank computes the
    whole reference and compares its slice): relative error norms, the worst rank's."""
    (q, k, v, g), do = inputs(T, args, device, seed=7)
    o_ref, _ = gla_cuda.chunk_gla(q, k, v, g, backend=args.backend)
    o_ref.backward(do)
    bounds = [T * r // W for r in range(W + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    local = [x.detach()[:, lo:hi].clone().requires_grad_() for x in (q, k, v, g)]
    o, _ = gla_dist.chunk_gla(*local, backend=args.backend)
    o.backward(do[:, lo:hi])
    errs = {"o": rel(o, o_ref[:, lo:hi])}
    for name, x, ref in zip(("dq", "dk", "dv", "dg"), local, (q, k, v, g)):
        errs[name] = rel(x.grad, ref.grad[:, lo:hi])
    worst = torch.tensor(list(errs.values()), dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(errs, worst.tolist()))


def main(argv=None):
    args = parse_args(argv)
    rank, W, device = setup(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"context-parallel GLA on {W} x {device.type}: H {args.heads}, K {args.k}, V {args.v}, {args.dtype}")
    result = {"rows": [], "check": None}
    if args.check_tokens:
        try:
            errs = check(args.check_tokens, args, rank, W, device)
            # bf16 inputs: the kernels' own rounding; float32: TF32 products on the GPU
            ok = max(errs.values()) < (3e-2 if args.dtype != "fp32" else 2e-3)
            result["check"] = {"tokens": args.check_tokens, "errors": errs, "ok": ok}
            log(f"check at {args.check_tokens} tokens against one device: "
                + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + ("  ok" if ok else "  FAILS"))
        except torch.cuda.OutOfMemoryError:
            log(f"check at {args.check_tokens} tokens: the whole sequence does not fit one GPU, skipped")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log(f"{'tokens':>9} {'per GPU':>9} {'cp ms':>9} {'local ms':>9} {'comm ms':>8} {'comm %':>7} "
        f"{'efficiency':>10} {'MB/rank':>8}")
    for T in args.tokens:
        row = bench(T, args, rank, W, device)
        result["rows"].append(row)
        log(f"{T:>9} {row['tokens_per_gpu']:>9} {row['cp_ms']:>9.3f} {row['local_ms']:>9.3f} "
            f"{row['comm_ms']:>8.3f} {100 * row['comm_share']:>6.1f}% {row['efficiency']:>10.3f} "
            f"{row['comm_bytes_per_rank'] / 1e6:>8.2f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()
    failed = result["check"] is not None and not result["check"]["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
