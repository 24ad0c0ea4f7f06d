"""Where the host time of one training step goes (GPU dev tool, not a test).

    python3 tools/host_profile.py [B,T,H,K,V]

Prints the host microseconds of every layer of a forward+backward (the public call, the
autograd op, the backend choice, the compiled op alone, ...), each the best of a few rounds
of calls queued without syncing; then the host latencies inside one step, the GPU's timeline of
a step after a do_bench-like cache flush (gaps are the GPU waiting for the host) and a cProfile
of the forward's Python.
"""
import cProfile
import pstats
import sys
import time

import torch

import gla_cuda
from gla_cuda import dispatch
from gla_cuda.backends import cuda as cb
from gla_cuda.bench import cases
from gla_cuda.intermediates import ChunkSlots
from gla_cuda.testing import make_inputs


def host_us(fn, calls=10, rounds=7):
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return best


def main():
    shape = tuple(map(int, (sys.argv[1] if len(sys.argv) > 1 else "8,2048,16,128,128").split(",")))
    B, T, H, K, V = shape
    ins = make_inputs(B, T, H, K, V, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=True)
    q, k, v, g = (ins[n] for n in "qkvg")
    leaves = (q, k, v, g)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    scale = K ** -0.5
    qd, kd_, vd, gd = (x.detach() for x in leaves)

    def step():
        for x in leaves:
            x.grad = None
        o, _ = gla_cuda.chunk_gla(q, k, v, g)
        o.backward(do)

    o_keep, _ = gla_cuda.chunk_gla(q, k, v, g)
    out = torch.ops.gla.chunk_fwd_train(qd, kd_, vd, gd, scale, None, False, None, "auto")
    saved = out[2:]
    meta = ChunkSlots(qd, None)
    rows = {
        "fwd+bwd (chunk_gla, o.backward)": step,
        "fwd with grad (chunk_gla)": lambda: gla_cuda.chunk_gla(q, k, v, g),
        "o.backward(retain_graph)": lambda: o_keep.backward(do, retain_graph=True),
        "gla::chunk_fwd_train": lambda: torch.ops.gla.chunk_fwd_train(qd, kd_, vd, gd, scale, None, False,
                                                                     None, "auto"),
        "cuda.chunk_fwd_saving": lambda: cb.chunk_fwd_saving(qd, kd_, vd, gd, scale, None, False, None),
        "gla::cuda_chunk_fwd_saving": lambda: torch.ops.gla.cuda_chunk_fwd_saving(
            qd, kd_, vd, gd, scale, None, False, None, meta.chunk_off, meta.NC),
        "dispatch.saving_backend": lambda: dispatch.saving_backend(qd, kd_, vd, gd, None, None, "auto"),
        "dispatch.choose(chunk_bwd)": lambda: dispatch.choose("chunk_bwd", qd, kd_, vd, gd, None, None, "auto",
                                                              full=False),
        "intermediates.ChunkSlots": lambda: ChunkSlots(qd, None),
        "gla::chunk_bwd_saved": lambda: torch.ops.gla.chunk_bwd_saved(qd, kd_, vd, gd, scale, None, None, do,
                                                                     None, "auto", *saved),
        "cuda.chunk_bwd(saved)": lambda: cb.chunk_bwd(qd, kd_, vd, gd, scale, None, None, do, None,
                                                      saved=saved),
        "gla::cuda_chunk_bwd_saved": lambda: torch.ops.gla.cuda_chunk_bwd_saved(
            qd, kd_, vd, gd, scale, None, None, do, None, meta.chunk_off, meta.chunk_seq, *saved),
        "torch.empty_like(q) (baseline)": lambda: torch.empty_like(qd),
    }
    fla = cases._fla()[0]
    if fla is not None:
        def fla_step():
            for x in leaves:
                x.grad = None
            o, _ = fla(q, k, v, g)
            o.backward(do)
        rows["fla fwd+bwd"] = fla_step
    print(f"shape {shape}: host us per call (best of 7 rounds of 10 queued calls)")
    for name, fn in rows.items():
        fn()
        print(f"  {name:<36} {host_us(fn):9.1f}")

    # host latencies inside a step: call -> the compiled op's entry -> its return -> the call's
    # return, for the training forward and for the backward (through the autograd engine)
    stamps = []

    def stamped(name):
        real = getattr(torch.ops.gla, name)

        def op(*a):
            stamps.append(time.perf_counter())
            out = real(*a)
            stamps.append(time.perf_counter())
            return out
        setattr(torch.ops.gla, name, op)
        return real
    reals = {n: stamped(n) for n in ("cuda_chunk_fwd_saving", "chunk_bwd_saved")}
    lat = []
    for _ in range(30):
        for x in leaves:
            x.grad = None
        torch.cuda.synchronize()
        stamps.clear()
        t0 = time.perf_counter()
        o, _ = gla_cuda.chunk_gla(q, k, v, g)
        t1 = time.perf_counter()
        o.backward(do)
        t2 = time.perf_counter()
        f0, f1, b0, b1 = stamps
        lat.append((f0 - t0, f1 - f0, t1 - f1, b0 - t1, b1 - b0, t2 - b1))
    for name, real in reals.items():
        setattr(torch.ops.gla, name, real)
    med = [sorted(c)[len(c) // 2] * 1e6 for c in zip(*lat)]
    print("\nhost latency, us (median of 30 steps): forward call -> compiled op %.1f, op %.1f, op -> return %.1f;"
          " backward() -> chunk_bwd_saved %.1f, chunk_bwd_saved %.1f, -> return %.1f" % tuple(med))

    # the GPU's timeline of do_bench-like steps: a 256 MB cache flush (a kernel of its own
    # name), then the step
    flush = torch.empty(1 << 26, dtype=torch.int32, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tl:
        for _ in range(3):
            flush.bitwise_not_()
            step()
        torch.cuda.synchronize()
    kern = sorted((e.time_range.start, e.time_range.end, e.name) for e in tl.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA)
    starts = [i for i, (_, _, n) in enumerate(kern) if "bitwise_not" in n.lower()]
    last = kern[starts[-1]:] if starts else kern
    print("\nGPU timeline of the last step (us from the flush's end; gap = idle before the kernel):")
    t_prev = last[0][1]
    for t0, t1, name in last[1:]:
        print(f"  {t0 - last[0][1]:8.1f} +{t1 - t0:7.1f}  gap {t0 - t_prev:6.1f}  {name[:90]}")
        t_prev = t1
    print(f"  step: {t_prev - last[0][1]:.1f} us after the flush")

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(20):
        gla_cuda.chunk_gla(q, k, v, g)
    prof.disable()
    torch.cuda.synchronize()
    print("\ncProfile of 20 forwards with grad (tottime):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
