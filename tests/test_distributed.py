"""Context parallelism (gla_cuda.distributed.chunk_gla): 2 and 4 processes on the CPU over gloo
against single-process chunk_gla on the whole sequence and the float64 oracle: outputs, final
states and every gradient, with sequences spanning ranks, empty slices, empty sequences, strong
gates and initial states; torch.compile(fullgraph=True); the same on one GPU shared by two
processes (the compiled kernels) where CUDA is present."""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gla_cuda
from gla_cuda import distributed as gla_dist
from conftest import HAS_CUDA, TOL, make_inputs, oracle, rel_err

H, K, V = 2, 8, 4

# Each case: per-rank slice lengths; cu_seqlens (global) or None (B rows, each one sequence).
CASES = {
    2: [
        dict(lengths=[70, 45], B=2, h0=True, final=True),
        dict(lengths=[0, 50], B=1, h0=True, final=True),                   # rank 0 empty: h0 passes through
        dict(lengths=[60, 80], cu=[0, 30, 30, 100, 101, 140, 140], h0=True, final=True),
        dict(lengths=[100, 40], cu=[0, 90, 140], gate="strong", h0=True, final=True),
        dict(lengths=[33, 31], B=2),                                       # no initial or final state
    ],
    4: [
        dict(lengths=[20, 0, 65, 15], B=1, h0=True, final=True),
        dict(lengths=[40, 0, 30, 80], cu=[0, 10, 90, 91, 91, 150], h0=True, final=True),
        dict(lengths=[37, 37, 37, 39], cu=[0, 5, 120, 150], gate="strong", h0=True, final=True, offsets=True),
        dict(lengths=[40, 40, 35, 35], cu=[0, 0, 40, 80, 150], h0=True, final=True),  # starts at boundaries
        dict(lengths=[0, 25, 0, 0], cu=[0, 25], final=True),
    ],
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world_size, *args):
    port = _free_port()
    mp.spawn(_entry, args=(world_size, port, fn, args), nprocs=world_size, join=True)


def _entry(rank, world_size, port, fn, args):
    torch.set_num_threads(1)
    backend = "gloo"
    # a collective that one rank never joins fails after the timeout instead of hanging the suite
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world_size, *args)
    except BaseException:
        # the first failure matters; the others see their peer's connection close
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _gather_cat(x, dim=1):
    """Every rank's slice, concatenated along dim (all ranks get the whole tensor)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts, dim)


def _run_case(rank, W, seed, case, device="cpu", backend="reference", compile_fn=False):
    lengths, cu = case["lengths"], case.get("cu")
    Ttot = sum(lengths)
    B = 1 if cu is not None else case["B"]
    N = B if cu is None else len(cu) - 1
    ins = make_inputs(B, Ttot, H, K, V, device=device, gate=case.get("gate", "normal"),
                      h0=case.get("h0", False), N=N, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, Ttot, H, V, generator=gen, dtype=torch.float64).float().to(device)
    dhts = [torch.randn(N, H, K, V, generator=gen, dtype=torch.float64).float().to(device) for _ in range(W)]
    final = case.get("final", False)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])

    local = {n: (x[:, lo:hi] if n != "initial_state" else x).detach().clone().requires_grad_()
             for n, x in ins.items()}
    offsets = None
    if case.get("offsets"):
        offsets = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(W)], dtype=torch.int64)

    def step(q, k, v, g, initial_state=None):
        return gla_dist.chunk_gla(q, k, v, g, initial_state=initial_state, output_final_state=final,
                                  cu_seqlens=cu_t, backend=backend, slice_offsets=offsets)
    fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compile_fn else step
    o, ht = fn(**local)
    loss = (o * do[:, lo:hi]).sum()
    if final:
        loss = loss + (ht * dhts[rank]).sum()
    loss.backward()

    got = {"o": _gather_cat(o)}
    if final:
        every = _gather_cat(ht[None], 0)
        assert all(torch.equal(every[0], x) for x in every), "final states differ between ranks"
        got["ht"] = ht
    for n in ("q", "k", "v", "g"):
        got["d" + n] = _gather_cat(local[n].grad)
    if "initial_state" in local:
        dh0 = local["initial_state"].grad
        dh0 = torch.zeros_like(local["initial_state"]) if dh0 is None else dh0.detach().clone()
        dist.all_reduce(dh0)  # each rank holds its part of the gradient: the sum is the whole
        got["dh0"] = dh0
    if rank != 0:
        return  # every rank has the whole results: one compares them

    # single process on the whole sequence: the loss is the sum of the ranks' losses
    full = {n: x.detach().clone().requires_grad_() for n, x in ins.items()}
    dht_sum = sum(dhts)
    o_ref, ht_ref = gla_cuda.chunk_gla(**full, output_final_state=True, cu_seqlens=cu_t, backend=backend)
    ((o_ref * do).sum() + (ht_ref * dht_sum).sum() * final).backward()
    o64, ht64, grads64 = oracle(ins, cu_seqlens=cu_t, do=do, dht=dht_sum if final else None)
    want = {"o": (o_ref, o64), "ht": (ht_ref, ht64)}
    for i, n in enumerate(("q", "k", "v", "g", "initial_state")):
        if n in full:
            want["dh0" if n == "initial_state" else "d" + n] = (full[n].grad, grads64[i])
    tol = TOL[torch.float32]
    for name, x in got.items():
        single, exact = want[name]
        assert rel_err(x, exact) < tol, (case, name, "against the float64 oracle", rel_err(x, exact))
        # the same kernels on the same tokens: close to the single process, beyond the oracle's tolerance
        assert rel_err(x, single) < tol / 4, (case, name, "against one process", rel_err(x, single))


def _cases_worker(rank, W, seed, cases):
    for i, case in enumerate(cases):
        if os.environ.get("GLA_TEST_VERBOSE"):
            print(rank, "case", i, case, flush=True)
        _run_case(rank, W, seed + 10 * i, case)
    _layer_case(rank, W, seed)
    if W == 2:
        _errors_worker(rank, W)


def _layer_case(rank, W, seed, lengths=(50, 0, 30, 21)):
    """GatedLinearAttention(cp_group=...) on this rank's slice against the layer on the whole
    sequence: outputs, the cached final state and the parameters' gradients (summed over the
    ranks, as data-parallel training reduces them)."""
    lengths = list(lengths[:W - 1]) + [sum(lengths[W - 1:])]
    torch.manual_seed(seed)
    whole = gla_cuda.GatedLinearAttention(hidden_size=32, num_heads=2, layer_idx=0)
    split = gla_cuda.GatedLinearAttention(hidden_size=32, num_heads=2, layer_idx=0, cp_group=dist.group.WORLD)
    split.load_state_dict(whole.state_dict())
    x = torch.randn(2, sum(lengths), 32, generator=torch.Generator().manual_seed(seed))
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    y, cache = split(x[:, lo:hi], use_cache=True)
    y_ref, cache_ref = whole(x, use_cache=True)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert rel_err(_gather_cat(y), y_ref) < 1e-4
    assert rel_err(cache[0], cache_ref[0]) < 1e-4
    for (name, p), p_ref in zip(split.named_parameters(), whole.parameters()):
        grad = p.grad.detach().clone()
        dist.all_reduce(grad)
        assert rel_err(grad, p_ref.grad) < 1e-4, name


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_single_process(world_size):
    _spawn(_cases_worker, world_size, torch.seed() % 2**30, CASES[world_size])


def _compile_worker(rank, W, seed):
    _run_case(rank, W, seed, CASES[2][2], compile_fn=True)  # packed: the device-side piece mapping


def test_torch_compile_fullgraph():
    """Traced in one graph (fullgraph=True) with the functional collectives, backward included."""
    _spawn(_compile_worker, 2, torch.seed() % 2**30)


def _gpu_worker(rank, W, seed):
    torch.cuda.set_device(0)
    for i, case in enumerate(CASES[2]):
        _run_case(rank, W, seed + 10 * i, case, device="cuda", backend=None)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_one_gpu_two_processes():
    """Two processes on one GPU (gloo carries the CUDA tensors): the kernels auto picks."""
    _spawn(_gpu_worker, 2, torch.seed() % 2**30)


def test_communication_bytes():
    b = gla_dist.communication_bytes(8, 16, 128, 128, pieces=1, num_states=0, offsets=False)
    block = 16 * 128 * 129 * 4
    assert b["gathered"] == 8 * block and b["all_gather"] == 7 * block == b["reduce_scatter"]
    assert b["total"] == 14 * block
    one = gla_dist.communication_bytes(1, 16, 128, 128, num_states=4)
    assert one["total"] == 0


def _errors_worker(rank, W):
    q = torch.zeros(1, 4, H, K)
    v = torch.zeros(1, 4, H, V)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        gla_dist.chunk_gla(q, q, v, q, cu_seqlens=torch.tensor([1, 8]))
    with pytest.raises(ValueError, match="slice_offsets gives rank"):
        gla_dist.chunk_gla(q, q, v, q, cu_seqlens=torch.tensor([0, 8]), slice_offsets=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must end at the total length 8"):
        gla_dist.chunk_gla(q, q, v, q, cu_seqlens=torch.tensor([0, 3]))  # 2 ranks x 4 tokens
    with pytest.raises(ValueError, match="slice_offsets is for packed"):
        gla_dist.chunk_gla(q, q, v, q, slice_offsets=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\]"):
        gla_dist.chunk_gla(q, q, v, q, initial_state=torch.zeros(2, H, K, V), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(TypeError, match="group must be"):
        gla_dist.chunk_gla(q, q, v, q, group=3)


def test_needs_torch_distributed():
    """Bad arguments inside a process group: the 2-process run (_errors_worker)."""
    with pytest.raises(RuntimeError, match="init_process_group"):
        gla_dist.chunk_gla(*(torch.zeros(1, 4, H, K),) * 4)


def test_train_example_fsdp2_cp_matches_one_process(tmp_path):
    """examples/train_distributed.py under torchrun (2 processes, gloo): FSDP2 with the sequence
    split across the ranks follows the one-process run step by step."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "examples", "train_distributed.py")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    runs = {"one": [], "cp": ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]}
    losses = {}
    for name, launcher in runs.items():
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, *launcher, script, "--device", "cpu", "--tiny", "--out", str(out)]
        if name == "cp":
            cmd.append("--cp")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        losses[name] = json.loads(out.read_text())["losses"]
    assert len(losses["one"]) == len(losses["cp"]) == 4
    for a, b in zip(losses["one"], losses["cp"]):
        assert abs(a - b) < 1e-5 * abs(a), losses
