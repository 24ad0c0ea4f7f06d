"""Timings of the serving ops over a state pool (GPU).

Prefill from a pool: N sequences x T tokens packed (cu_seqlens), every sequence starting
from its slot and writing its final state back, against
  * chunk_gla with a dense initial_state and output_final_state (no pool: the compute floor
    of the chunked forward; a server would still have to gather and scatter),
  * the same with a PyTorch gather and scatter around it (index_select, index_copy_),
  * chunk_gla_pooled (the compiled kernels read and write the slots), the same forced onto the
    Triton backend's gather / chunked forward / scatter composition, and chunk_gla_pooled with
    checkpoints every 128 tokens.
Speculative-decoding verify: N rows x T draft tokens, the state after every token to its own
slot (fused_recurrent_gla_verify_pooled), against its memory floor: the bytes it must move
(one state read and T state writes per row, q/k/v/g in, o out) at the copy bandwidth
measured on the same GPU.

    python tools/bench_serving.py                      # the rows the serving engines need
    python tools/bench_serving.py --N 64 --T 512 --H 16 --K 128 --V 128 --draft 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import gla_cuda


def timed(fn, warmup=3, iters=20):
    """Median milliseconds of fn() over iters runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def inputs(B, T, H, K, V, dtype, dev):
    q, k = (torch.randn(B, T, H, K, device=dev, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16
    return q, k, v, g


def copy_bandwidth(dev, nbytes=1 << 30):
    """Bytes per millisecond of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * nbytes / ms


def bench_prefill(a, dev, rows):
    N, T, H, K, V = a.N, a.T, a.H, a.K, a.V
    dtype = getattr(torch, a.dtype)
    P = 4 * N
    q, k, v, g = (x.reshape(1, N * T, *x.shape[2:]) for x in inputs(N, T, H, K, V, dtype, dev))
    cu = torch.arange(N + 1, device=dev, dtype=torch.int32) * T
    slots = torch.randperm(P, device=dev)[:N]
    for v_first in (True, False):
        pool = torch.zeros((P, H, V, K) if v_first else (P, H, K, V), device=dev)
        layout = "V-first" if v_first else "K-first"
        h0 = torch.randn(N, H, K, V, device=dev)

        def dense():
            return gla_cuda.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)

        def gather_scatter():
            s = pool.index_select(0, slots)
            s = s.transpose(-1, -2).contiguous() if v_first else s
            o, ht = gla_cuda.chunk_gla(q, k, v, g, initial_state=s, output_final_state=True, cu_seqlens=cu)
            pool.index_copy_(0, slots, ht.transpose(-1, -2) if v_first else ht)
            return o

        def pooled(backend=None):
            return gla_cuda.chunk_gla_pooled(q, k, v, g, pool, slots, cu, state_v_first=v_first, backend=backend)

        marks = torch.randperm(P, device=dev)[N:N + N * (T // 128)].view(N, T // 128) \
            if T >= 128 and N * (T // 128) <= P - N else None

        def pooled_marks():
            return gla_cuda.chunk_gla_pooled(q, k, v, g, pool, slots, cu, state_v_first=v_first,
                                             checkpoint_every=128, checkpoint_indices=marks)
        cases = [("chunk_gla, dense initial_state (no pool)", dense),
                 (f"gather + chunk_gla + scatter (PyTorch), {layout}", gather_scatter),
                 (f"chunk_gla_pooled, {layout}", pooled),
                 (f"chunk_gla_pooled, gather/scatter composition (backend='triton'), {layout}",
                  lambda: pooled("triton"))]
        if marks is not None:
            cases.append((f"chunk_gla_pooled + checkpoints/128, {layout}", pooled_marks))
        if not v_first:
            cases = cases[1:]  # the dense row once
        for name, fn in cases:
            rows.append(dict(op="prefill", case=name, N=N, T=T, H=H, K=K, V=V, dtype=a.dtype, ms=timed(fn)))
    print(gla_cuda.explain_backend(q, k, v, g, initial_state=pool, cu_seqlens=cu, op="chunk_pool_fwd_"))


def bench_verify(a, dev, rows, bandwidth):
    N, D, H, K, V = a.N, a.draft, a.H, a.K, a.V
    dtype = getattr(torch, a.dtype)
    P = (D + 1) * N
    q, k, v, g = inputs(N, D, H, K, V, dtype, dev)
    idx = torch.randperm(P, device=dev)[:N * D].view(N, D)
    accepted = torch.randint(1, D + 1, (N,), device=dev)
    state = H * K * V * 4
    io = (q.numel() + k.numel() + v.numel()) * q.element_size() + g.numel() * g.element_size() + \
        v.numel() * v.element_size()
    floor = (N * (1 + D) * state + io) / bandwidth
    for v_first in (True, False):
        pool = torch.zeros((P, H, V, K) if v_first else (P, H, K, V), device=dev)
        layout = "V-first" if v_first else "K-first"

        def verify():
            return gla_cuda.fused_recurrent_gla_verify_pooled(q, k, v, g, pool, idx, accepted,
                                                              state_v_first=v_first)
        ms = timed(verify)
        rows.append(dict(op="verify", case=f"fused_recurrent_gla_verify_pooled, {layout}", N=N, T=D, H=H,
                         K=K, V=V, dtype=a.dtype, ms=ms, floor_ms=floor, of_floor=floor / ms))
    print(gla_cuda.explain_backend(q, k, v, g, initial_state=pool, op="recurrent_verify_pool_fwd_"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--draft", type=int, default=4, help="draft tokens per row in the verify")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_serving needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    bw = copy_bandwidth(dev)
    bench_prefill(a, dev, rows)
    bench_verify(a, dev, rows, bw)
    print(f"\n{torch.cuda.get_device_name(dev)}; copy bandwidth {bw / 1e9:.2f} TB/s")
    for r in rows:
        extra = f"  floor {r['floor_ms']:.3f} ms ({100 * r['of_floor']:.0f}% of it)" if "floor_ms" in r else ""
        print(f"{r['op']:<8} N={r['N']} T={r['T']} H={r['H']} K={r['K']} V={r['V']} {r['dtype']:<9} "
              f"{r['ms']:8.3f} ms  {r['case']}{extra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
