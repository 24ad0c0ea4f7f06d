"""GatedLinearAttention and GLACache: semantics, generation, padding, gradients, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import gla_cuda
from gla_cuda import layers
from conftest import DEVICES, HAS_CUDA, TOL, rel_err

HIDDEN = 64
OPTIONS = {
    "default": dict(num_heads=4),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "no_gate_clamp": dict(num_heads=2, use_output_gate=False, clamp_min=-0.02),
    "wide": dict(num_heads=2, expand_k=1.0, expand_v=2.0, gate_logit_normalizer=4, elementwise_affine=False),
}


def make_layer(device, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    layer = gla_cuda.GatedLinearAttention(hidden_size=HIDDEN, layer_idx=0, **kw).to(device, dtype)
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm shows up
        for p in layer.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return layer


def x_of(B, T, device, dtype=torch.float32, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def tol(device, dtype=torch.float32):
    return 1e-4 if (device == "cpu" and dtype == torch.float32) else TOL[dtype]


def run(layer, x, chunk=True, **kw):
    """Forward without autograd; chunk=True takes the chunked kernel (training mode) even for short T."""
    layer.train(chunk)
    with torch.no_grad():
        return layer(x, **kw)


def naive_layer(layer, x):
    """float64 re-derivation of the layer from its parameters, step by step (the spec)."""
    P = {n: p.detach().double().cpu() for n, p in layer.named_parameters()}
    x = x.detach().double().cpu()
    B, T, _ = x.shape
    H, Dk, Dv, G = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.num_kv_groups
    heads = lambda t, d, rep: t.view(B, T, -1, d).repeat_interleave(rep, dim=2)
    q = heads(x @ P["q_proj.weight"].T, Dk, 1)
    k = heads(x @ P["k_proj.weight"].T, Dk, G)
    v = heads(x @ P["v_proj.weight"].T, Dv, G)
    gk = x @ P["gk_proj.0.weight"].T @ P["gk_proj.1.weight"].T + P["gk_proj.1.bias"]
    g = heads(F.logsigmoid(gk) / layer.gate_logit_normalizer, Dk, G)
    if layer.clamp_min is not None:
        g = g.clamp_min(layer.clamp_min)
    S = torch.zeros(B, H, Dk, Dv, dtype=torch.float64)
    o = torch.empty(B, T, H, Dv, dtype=torch.float64)
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * Dk ** -0.5, S)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)
    norm = "g_norm_swish_gate.weight" if layer.use_output_gate else "g_norm.weight"
    if norm in P:
        o = o * P[norm]
    if layer.use_output_gate:
        o = o * F.silu(x @ P["g_proj.weight"].T).view(B, T, H, Dv)
    return o.flatten(-2) @ P["o_proj.weight"].T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_shapes_and_semantics(device, name, mode):
    layer = make_layer(device, mode=mode, **OPTIONS[name])
    x = x_of(2, 19, device)
    o, cache = run(layer, x, use_cache=True)
    assert o.shape == x.shape and o.dtype == x.dtype
    assert isinstance(cache, gla_cuda.GLACache) and cache.get_seq_length(0) == 19
    assert cache[0].shape == (2, layer.num_heads, layer.head_k_dim, layer.head_v_dim)
    assert cache[0].dtype == torch.float32
    assert rel_err(o, naive_layer(layer, x)) <= tol(device)
    o_plain, none = run(layer, x)
    assert none is None and torch.allclose(o_plain, o)
    state = cache[0]
    cache.reorder_cache(torch.tensor([1, 1]))  # beam search keeps row 1 twice
    assert torch.equal(cache[0], state[[1, 1]])


def test_fla_parameter_names():
    """Same submodule names and shapes as fla's layer, so its checkpoints load."""
    names = {n: tuple(p.shape) for n, p in make_layer("cpu", num_heads=4, num_kv_heads=2).named_parameters()}
    assert names == {"q_proj.weight": (32, 64), "k_proj.weight": (16, 64), "v_proj.weight": (32, 64),
                     "gk_proj.0.weight": (16, 64), "gk_proj.1.weight": (16, 16), "gk_proj.1.bias": (16,),
                     "g_proj.weight": (64, 64), "g_norm_swish_gate.weight": (16,), "o_proj.weight": (64, 64)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["default", "gqa", "no_gate_clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_matches_full(device, name, dtype, monkeypatch):
    layer = make_layer(device, dtype, **OPTIONS[name])
    x = x_of(2, 30, device, dtype)
    full, _ = run(layer, x)
    prompt, cache = run(layer, x[:, :22], use_cache=True)  # chunked prefill

    calls = []  # decoding one token must take a recurrent kernel (in place on the cached state)
    for fn in ("fused_recurrent_gla", "fused_recurrent_gla_pooled"):
        monkeypatch.setattr(layers, fn, lambda *a, _fn=getattr(layers, fn), **k: calls.append(1) or _fn(*a, **k))
    steps = [run(layer, x[:, t:t + 1], chunk=False, past_key_values=cache, use_cache=True)[0]
             for t in range(22, 30)]
    assert len(calls) == 8 and cache.get_seq_length() == 30
    assert rel_err(torch.cat([prompt] + steps, 1), full) <= tol(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [True, False])
def test_left_padded_batch_matches_unbatched(device, chunk):
    """Ragged prompts left-padded under attention_mask, then decoded, equal separate runs."""
    layer = make_layer(device, **OPTIONS["gqa"])
    lengths, T, steps = [13, 5, 1], 13, 4
    xs = [x_of(1, n + steps, device, seed=10 + i) for i, n in enumerate(lengths)]
    prompt = torch.stack([F.pad(x[0, :n], (0, 0, T - n, 0), value=3.0) for x, n in zip(xs, lengths)])
    mask = torch.stack([(torch.arange(T) >= T - n).long() for n in lengths]).to(device)

    o, cache = run(layer, prompt, chunk, attention_mask=mask, use_cache=True)
    outs = [o]
    for t in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(lengths), 1)], 1)
        token = torch.cat([x[:, n + t:n + t + 1] for x, n in zip(xs, lengths)])
        outs.append(run(layer, token, False, attention_mask=mask, past_key_values=cache, use_cache=True)[0])
    out = torch.cat(outs, 1)

    for i, (x, n) in enumerate(zip(xs, lengths)):
        ref_prompt, ref_cache = run(layer, x[:, :n], chunk, use_cache=True)
        ref = [ref_prompt] + [run(layer, x[:, n + t:n + t + 1], chunk=False, past_key_values=ref_cache,
                                  use_cache=True)[0] for t in range(steps)]
        assert rel_err(out[i:i + 1, T - n:], torch.cat(ref, 1)) <= tol(device)
        assert rel_err(cache[0][i:i + 1], ref_cache[0]) <= tol(device)
        assert (out[i, :T - n] == 0).all()  # padded positions give zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [True, False])
def test_masked_tokens_leave_a_cached_state_alone(device, chunk):
    """Masked positions neither write nor decay the state, also when it is not zero."""
    layer = make_layer(device, **OPTIONS["default"])
    x0, x1 = x_of(1, 9, device), x_of(1, 12, device, seed=2)
    keep = (torch.arange(12) >= 5).to(device)
    (_, cache_a), (_, cache_b) = (run(layer, x0, use_cache=True) for _ in range(2))
    mask = torch.cat([keep.new_ones(1, 9), keep[None]], 1)  # a bool mask works too
    o, _ = run(layer, x1, chunk, attention_mask=mask, past_key_values=cache_a, use_cache=True)
    ref, _ = run(layer, x1[:, keep], chunk, past_key_values=cache_b, use_cache=True)
    assert rel_err(o[:, keep], ref) <= tol(device) and (o[:, ~keep] == 0).all()
    assert rel_err(cache_a[0], cache_b[0]) <= tol(device)


@pytest.mark.parametrize("device", DEVICES)
def test_cu_seqlens_matches_unbatched(device):
    layer = make_layer(device, **OPTIONS["default"])
    lengths = [7, 0, 12]
    xs = [x_of(1, n, device, seed=20 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, 7, 7, 19], device=device)
    o, cache = run(layer, torch.cat(xs, 1), cu_seqlens=cu, use_cache=True)
    assert cache[0].shape[0] == 3
    for i, x in enumerate(xs):
        ref, ref_cache = run(layer, x, use_cache=True)
        assert rel_err(o[:, cu[i]:cu[i + 1]], ref) <= tol(device)
        assert rel_err(cache[0][i:i + 1], ref_cache[0]) <= tol(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gqa", "no_gate_clamp"])
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_gradients_reach_every_parameter(device, name, mode):
    opts = dict(OPTIONS[name], clamp_min=None)  # a clamp would cut the gate's gradient where it binds
    layer = make_layer(device, mode=mode, **opts).train()
    x = x_of(2, 17, device).requires_grad_()
    layer(x)[0].pow(2).sum().backward()
    for n, p in list(layer.named_parameters()) + [("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    """A decode step (recurrent path, with a cache) and training forward+backward (chunked path)."""
    torch._dynamo.reset()
    layer = make_layer(device, **OPTIONS["gqa"])
    compiled = torch.compile(layer, fullgraph=True)
    x = x_of(2, 20, device)

    layer.eval()
    with torch.no_grad():  # a decode step: reads and updates the cache inside the graph
        ca, cb = (layer(x[:, :19], use_cache=True)[1] for _ in range(2))
        a, ca = compiled(x[:, 19:], past_key_values=ca, use_cache=True)
        b, cb = layer(x[:, 19:], past_key_values=cb, use_cache=True)
    assert rel_err(a, b) <= tol(device) and rel_err(ca[0], cb[0]) <= tol(device)
    assert ca.get_seq_length() == cb.get_seq_length() == 20

    layer.train()
    grads = []
    for fn in (compiled, layer):
        layer.zero_grad()
        loss = fn(x)[0].pow(2).sum()
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= tol(device)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_decode_loop_reduce_overhead_matches_eager():
    """Prefill, then token-by-token decoding through torch.compile(mode="reduce-overhead"),
    i.e. CUDA graphs replayed every step, against the same loop in eager mode."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    layer = make_layer("cuda", **OPTIONS["gqa"]).eval()
    step = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    x = x_of(2, 16, "cuda")
    with torch.no_grad():
        ca, cb = (layer(x[:, :8], use_cache=True)[1] for _ in range(2))
        for t in range(8, 16):
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's outputs are consumed
            a, ca = step(x[:, t:t + 1], past_key_values=ca, use_cache=True)
            a = a.clone()  # the next replay reuses the graph's output memory
            b, cb = layer(x[:, t:t + 1], past_key_values=cb, use_cache=True)
            assert rel_err(a, b) <= tol("cuda"), t
        assert rel_err(ca[0], cb[0]) <= tol("cuda")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])  # graphs ran


def test_bad_state_and_arguments():
    layer = make_layer("cpu", **OPTIONS["gqa"])
    x = x_of(2, 5, "cpu")

    def with_state(state):
        cache = gla_cuda.GLACache()
        cache.update(state, 0)
        return layer(x, past_key_values=cache)

    good = torch.zeros(2, 4, 8, 16)
    cases = [
        (good[:1], ValueError, r"cache state of layer 0 must have shape \[N, H, K, V\] = \(2, 4, 8, 16\)"),
        (good.transpose(2, 3), ValueError, "must have shape"),
        (good.bfloat16(), TypeError, "cache state of layer 0 must be float32"),
        (good.to("meta"), ValueError, "cache state of layer 0 is on meta"),
        (good.numpy(), TypeError, "cache state of layer 0 must be a Tensor"),
    ]
    for state, exc, match in cases:
        with pytest.raises(exc, match=match):
            with_state(state)
    with_state(good)  # the right state runs

    with pytest.raises(ValueError, match="layer_idx"):
        gla_cuda.GatedLinearAttention(hidden_size=HIDDEN)(x, use_cache=True)
    with pytest.raises(ValueError, match="either attention_mask or cu_seqlens"):
        layer(x[:1], attention_mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        gla_cuda.GatedLinearAttention(mode="parallel")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        gla_cuda.GatedLinearAttention(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        gla_cuda.GatedLinearAttention(hidden_size=60, num_heads=8)
