"""The torch.ops.gla operators: opcheck, gradcheck and torch.compile."""
import functools

import pytest
import torch

import gla_cuda
from conftest import DEVICES, HAS_CUDA, MODES, TOL, make_inputs, oracle, rel_err, skip_unless_runs
from gla_cuda import dispatch


def _op_args(ins, with_h0, cu=None, backend="auto"):
    q, k, v, g = ins["q"], ins["k"], ins["v"], ins["g"]
    return q, k, v, g, 0.25, ins.get("initial_state") if with_h0 else None, True, cu, backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("varlen", [True, False])
def test_opcheck(device, mode, with_h0, varlen):
    cu = torch.tensor([0, 3, 19], dtype=torch.int32, device=device) if varlen else None
    ins = make_inputs(1 if varlen else 2, 19, 2, 16, 8, device=device, h0=True, N=2)
    for x in ins.values():
        x.requires_grad_()
    fwd_args = _op_args(ins, with_h0, cu)
    torch.library.opcheck(getattr(torch.ops.gla, f"{mode}_fwd"), fwd_args)

    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args]
    q, k, v, g, scale, h0, _, cu, backend = detached
    do = torch.randn_like(v)
    dht = torch.randn(2, 2, 16, 8, device=device)
    torch.library.opcheck(getattr(torch.ops.gla, f"{mode}_bwd"), (q, k, v, g, scale, h0, cu, do, dht, backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("varlen", [True, False])
def test_opcheck_training_ops(device, backend, varlen):
    """chunk_fwd_train keeps the forward's intermediates where the backward that runs can
    take them (here Triton), else returns [0] placeholders; chunk_bwd_saved takes them."""
    cu = torch.tensor([0, 3, 70], dtype=torch.int32, device=device) if varlen else None
    ins = make_inputs(1 if varlen else 2, 70, 2, 16, 8, device=device, h0=True, N=2)
    skip_unless_runs("chunk_bwd", backend, ins, cu)
    for x in ins.values():
        x.requires_grad_()
    args = _op_args(ins, True, cu, backend)
    torch.library.opcheck(torch.ops.gla.chunk_fwd_train, args)
    q, k, v, g, scale, h0, _, cu, _ = detached = [a.detach() if isinstance(a, torch.Tensor) else a
                                                   for a in args]
    saved = torch.ops.gla.chunk_fwd_train(*detached)[2:]
    assert all(x.dim() > 1 for x in saved) if backend == "triton" else all(x.numel() == 0 for x in saved)
    if backend == "triton":
        bwd_args = (q, k, v, g, scale, h0, cu, torch.randn_like(v), torch.randn_like(h0), backend) + tuple(saved)
        torch.library.opcheck(torch.ops.gla.chunk_bwd_saved, bwd_args)


def test_chunk_slots_layout():
    """The slots of the kept intermediates (gla_cuda.intermediates): each sequence's chunks in
    order, empty sequences holding none, the slots past the last one owned by no sequence."""
    from gla_cuda.intermediates import ChunkSlots, num_slots
    q = torch.empty(1, 70, 1, 8)
    cu = torch.tensor([0, 0, 1, 70], dtype=torch.int32)
    slots = ChunkSlots(q, cu)
    assert slots.N == 3 and slots.NC == num_slots(q, cu) == 4
    assert slots.chunk_off.tolist() == [0, 0, 1, 3] and slots.chunk_seq.tolist() == [1, 2, 2, 3]
    dense = ChunkSlots(torch.empty(2, 130, 1, 8), None)
    assert dense.NC == 6 and dense.chunk_off.tolist() == [0, 3, 6] and dense.chunk_seq.tolist() == [0] * 3 + [1] * 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["normal", "mixed"])
def test_training_forward_saves_what_the_backward_recomputes(device, gate):
    """The outputs and gradients through chunk_fwd_train (intermediates kept) equal,
    bitwise, those through chunk_fwd (the backward recomputes them): same kernels on the
    same inputs."""
    cu = torch.tensor([0, 5, 130, 200], dtype=torch.int32, device=device)
    ins = make_inputs(1, 200, 2, 32, 24, dtype=torch.bfloat16, device=device, h0=True, N=3, gate=gate)
    do, dht = torch.randn_like(ins["v"]), torch.randn_like(ins["initial_state"])
    results = []
    for op in (torch.ops.gla.chunk_fwd_train, torch.ops.gla.chunk_fwd):
        leaves = [ins[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "initial_state")]
        o, ht = op(*leaves[:4], 0.2, leaves[4], True, cu, "triton")[:2]
        torch.autograd.backward([o, ht], [do, dht])
        results.append([o, ht] + [x.grad for x in leaves])
    (o1, ht1, *grads1), (o2, ht2, *grads2) = results
    for name, a, b in zip(("o", "ht", "dq", "dk", "dv", "dg", "dh0"), [o1, ht1] + grads1, [o2, ht2] + grads2):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
def test_eager_training_call_matches_the_op(device):
    """chunk_gla's eager training calls (ops.chunk_fwd_train: an autograd.Function around
    gla::chunk_fwd_train, without torch.library's per-call wrapper) give the op's outputs and
    gradients bitwise; the kept intermediates take no gradient, and a loss on the final state
    alone (no gradient reaches o: None, not materialised zeros) gives what zeros for o give."""
    from gla_cuda import ops
    cu = torch.tensor([0, 5, 130, 200], dtype=torch.int32, device=device)
    ins = make_inputs(1, 200, 2, 32, 24, dtype=torch.bfloat16, device=device, h0=True, N=3)
    skip_unless_runs("chunk_bwd", "triton", ins, cu)
    dht = torch.randn_like(ins["initial_state"])
    for do in (torch.randn_like(ins["v"]), None):
        results = []
        for call in (ops.chunk_fwd_train, torch.ops.gla.chunk_fwd_train):
            leaves = [ins[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "initial_state")]
            out = call(*leaves[:4], 0.2, leaves[4], True, cu, "triton")
            assert out[2].dim() > 1 and not any(x.requires_grad for x in out[2:])  # kept, no gradient
            o, ht = out[:2]
            if do is None and call is ops.chunk_fwd_train:
                ht.backward(dht)
            else:
                torch.autograd.backward([o, ht], [torch.zeros_like(o) if do is None else do, dht])
            results.append([o, ht] + [x.grad for x in leaves])
        for name, a, b in zip(("o", "ht", "dq", "dk", "dv", "dg", "dh0"), *results):
            assert torch.equal(a, b), (name, do is None)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (128, 192), (128, 256)])
@pytest.mark.parametrize("gate", ["normal", "mixed", "strong"])
@pytest.mark.parametrize("layout", ["batch", "varlen", "split"])
@pytest.mark.parametrize("kernel", ["mma_sync", "fused_sm90", "two_stage"])
def test_cuda_training_forward_keeps_what_triton_keeps(monkeypatch, K, V, gate, layout, kernel):
    """The CUDA forward's kept intermediates match the Triton forward's in layout and value,
    its o is the plain forward's of the same kernel (bitwise) and the oracle's, and the
    gradients through them match the float64 oracle. The kernel: mma.sync (GLA_CUDA_NO_WGMMA=1;
    the default off Hopper), or on sm_90 at K = 128, V a multiple of 128, forced for training
    and inference alike (GLA_CUDA_K128_FORWARD): the warp-specialised one (inference's default)
    or the two stages, prep then the wgmma walk (training's default). "split": one long
    sequence, walked in segments."""
    from gla_cuda.backends import cuda, triton
    from gla_cuda.intermediates import NAMES, ChunkSlots
    if kernel == "mma_sync":
        monkeypatch.setenv("GLA_CUDA_NO_WGMMA", "1")
    elif K != 128 or V % 128 or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper kernels of K = 128 run on sm_90, V a multiple of 128")
    else:
        monkeypatch.setenv("GLA_CUDA_K128_FORWARD", "fused" if kernel == "fused_sm90" else "two_stage")
    B, T, N, cu = {"batch": (2, 300, 2, None), "varlen": (1, 300, 3, [0, 5, 130, 300]),
                   "split": (1, 1100, 1, None)}[layout]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    ins = make_inputs(B, T, 1 if layout == "split" else 2, K, V, dtype=torch.bfloat16, device="cuda", h0=True,
                      N=N, gate=gate)
    skip_unless_runs("chunk_fwd", "cuda", ins, cu)
    names = ("q", "k", "v", "g", "initial_state")
    args = tuple(ins[n] for n in names[:4]) + (0.2, ins["initial_state"], True, cu)
    assert dispatch.saving_backend(*args[:4], ins["initial_state"], cu) == "cuda"
    o_c, ht_c, kept_c = cuda.chunk_fwd_saving(*args)
    o_t, ht_t, kept_t = triton.chunk_fwd_saving(*args)
    o_p, ht_p = cuda.chunk_fwd(*args)  # test_fused_sm90_k128 checks it against the oracle
    assert torch.equal(o_c, o_p) and torch.equal(ht_c, ht_p)
    off = ChunkSlots(ins["q"], cu).chunk_off.tolist()
    used = [s for n in range(len(off) - 1) for s in range(off[n], off[n + 1])]  # slots with tokens
    for name, a, b, tol in zip(NAMES, kept_c, kept_t,
                               (1e-2, 0, 1e-2, 1e-2, 1e-4, 1e-2)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name in ("flags", "decays", "states"):
            a, b = a[used], b[used]
        if name == "flags":
            assert torch.equal(a, b) and (gate != "strong" or bool(a.all())), name
        else:
            assert rel_err(a, b) <= tol, (name, rel_err(a, b))

    leaves = {n: ins[n].clone().requires_grad_() for n in names}
    o, ht = gla_cuda.chunk_gla(**leaves, scale=0.2, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    torch.autograd.backward([o, ht], [do, dht])
    ref_o, ref_ht, ref_grads = oracle(ins, 0.2, cu, do, dht)
    assert torch.equal(o, o_p)
    errors = {f"d{n}": rel_err(leaves[n].grad, r) for n, r in zip(names, ref_grads)}
    errors.update(o=rel_err(o, ref_o), ht=rel_err(ht, ref_ht))
    assert all(e <= TOL[torch.bfloat16] for e in errors.values()), errors


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("op", ["chunk_fwd", "chunk_bwd", "recurrent_fwd", "recurrent_bwd"])
@pytest.mark.parametrize("varlen", [True, False])
def test_opcheck_cuda_kernel_op(op, varlen):
    T = 14 if op == "recurrent_bwd" else 130  # the recurrent backward kernel takes T <= 16
    cu = torch.tensor([0, 3, T], dtype=torch.int32, device="cuda") if varlen else None
    ins = make_inputs(1 if varlen else 2, T, 2, 64, 64, dtype=torch.bfloat16, device="cuda", h0=True, N=2)
    skip_unless_runs(op, "cuda", ins, cu)
    q, k, v, g, scale, h0, final, cu, _ = _op_args(ins, True, cu)
    args = (q, k, v, g, scale, h0, final, cu)
    if op.endswith("bwd"):
        args = (q, k, v, g, scale, h0, cu, torch.randn_like(v), torch.randn_like(h0))
    if op == "chunk_bwd":  # the compiled chunked backward takes the training forward's intermediates
        from gla_cuda.backends import cuda as cuda_backend
        meta = cuda_backend._meta(q, cu)
        saved = cuda_backend.chunk_fwd_saving(q, k, v, g, scale, h0, False, cu)[2]
        args += (meta.chunk_off, meta.chunk_seq) + saved
        op = "chunk_bwd_saved"
    torch.library.opcheck(getattr(torch.ops.gla, f"cuda_{op}"), args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("varlen", [True, False])
def test_gradcheck_float64(mode, varlen):
    """Through the reference path, every differentiable input, incl. the final-state gradient."""
    cu = torch.tensor([0, 2, 2, 9], dtype=torch.int64) if varlen else None
    N = 3 if varlen else 2
    ins = make_inputs(1 if varlen else 2, 9, 2, 3, 4, dtype=torch.float64, h0=True, N=N)
    names = ("q", "k", "v", "g", "initial_state")
    leaves = [ins[n].clone().requires_grad_() for n in names]

    def f(q, k, v, g, h0):
        o, ht = MODES[mode](q, k, v, g, scale=0.7, initial_state=h0, output_final_state=True,
                            cu_seqlens=cu, backend="reference")
        return o, ht

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def _loss(q, k, v, g, h0, backend="auto"):
    o, ht = gla_cuda.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
    return (o.float() ** 2).sum() + ht.sum()


def _grads(loss_fn, ins):
    """Loss and gradients; with a compiled loss_fn, AOTAutograd compiles the backward too."""
    leaves = [ins[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "g", "initial_state")]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss] + [x.grad for x in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph(device, dynamic, backend):
    """Forward and backward compile with no graph break and match eager, also over T (the
    Triton backend: the training forward's intermediates pass through the graph)."""
    if device == "cpu" and backend == "triton" and dynamic:
        pytest.skip("slow under the Triton interpreter; the GPU run covers it")
    torch._dynamo.reset()
    loss = functools.partial(_loss, backend=backend)
    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for T in (40, 70, 100) if dynamic else (70,):
        ins = make_inputs(2, T, 2, 64, 64, dtype=dtype, device=device, h0=True)
        for a, b in zip(_grads(compiled, ins), _grads(loss, ins)):
            assert rel_err(a, b) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_compile_varlen_recurrent(device):
    torch._dynamo.reset()
    cu = torch.tensor([0, 4, 30, 31], dtype=torch.int32, device=device)
    ins = make_inputs(1, 31, 2, 16, 16, device=device, h0=True, N=3)

    def f(q, k, v, g, h0):
        o, ht = gla_cuda.fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                             cu_seqlens=cu)
        return o, ht

    args = [ins[n] for n in ("q", "k", "v", "g", "initial_state")]
    for a, b in zip(torch.compile(f, fullgraph=True)(*args), f(*args)):
        assert rel_err(a, b) <= TOL[torch.float32]


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_varlen(backend, mode):
    """With cu_seqlens on the GPU nothing synchronises with the host: forward and backward
    are captured in a CUDA graph and replayed on new inputs."""
    cu = torch.tensor([0, 0, 1, 70, 200, 263], dtype=torch.int32, device="cuda")
    ins = make_inputs(1, 263, 2, 64, 64, dtype=torch.bfloat16, device="cuda", h0=True, N=5)
    skip_unless_runs(f"{mode}_fwd", backend, ins, cu)
    bwd_backend = backend if gla_cuda.explain_backend(
        **ins, cu_seqlens=cu, op=f"{mode}_bwd", backend=backend).backend else "auto"
    fwd_op, bwd_op = getattr(torch.ops.gla, f"{mode}_fwd"), getattr(torch.ops.gla, f"{mode}_bwd")
    static = {k: v.clone() for k, v in ins.items()}
    do = torch.randn_like(static["v"])

    def step():
        q, k, v, g, h0 = (static[n] for n in ("q", "k", "v", "g", "initial_state"))
        o, ht = fwd_op(q, k, v, g, 0.125, h0, True, cu, backend)
        grads = bwd_op(q, k, v, g, 0.125, h0, cu, do, ht, bwd_backend)
        return (o, ht) + tuple(grads)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (compiles Triton kernels) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = make_inputs(1, 263, 2, 64, 64, dtype=torch.bfloat16, device="cuda", h0=True, N=5)
    for k, v in fresh.items():
        static[k].copy_(v)
    graph.replay()
    expected = step()
    for a, b in zip(captured, expected):
        assert rel_err(a, b) < 1e-5  # same inputs, same kernels: equal up to atomics' order
