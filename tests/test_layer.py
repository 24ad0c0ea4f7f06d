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
# Together these set every constructor argument of fla 0.6.0's layer to a non-default value.
FLA_OPTIONS = {
    "conv": dict(num_heads=4, use_short_conv=True),
    "conv_bias_gqa": dict(num_heads=4, num_kv_heads=2, use_short_conv=True, conv_size=3, conv_bias=True),
    "conv2_no_output_gate": dict(num_heads=2, use_output_gate=False, use_short_conv=True, conv_size=2),
    "feature_map_relu": dict(num_heads=2, feature_map="relu"),
    "gate_fn_sigmoid": dict(num_heads=2, gate_fn="sigmoid"),
    "unfused_swish": dict(num_heads=2, fuse_norm=False),
    "silu_by_name": dict(num_heads=2, gate_fn="silu"),
    "gelu_no_affine": dict(num_heads=2, gate_fn="gelu", elementwise_affine=False, norm_eps=1e-3),
    "sqrelu_low_rank": dict(num_heads=2, feature_map="sqrelu", gate_low_rank_dim=8, gate_logit_normalizer=8,
                            clamp_min=-0.05, expand_k=0.25, expand_v=0.5),
    "fused_chunk_everything": dict(mode="fused_chunk", num_heads=4, num_kv_heads=2, use_short_conv=True,
                                   conv_bias=True, feature_map="sigmoid", gate_fn="relu", fuse_norm=False),
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


ACT = {"relu": F.relu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "silu": F.silu, "swish": F.silu,
       "sqrelu": lambda t: F.relu(t) ** 2,
       "gelu": lambda t: 0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (t + 0.044715 * t ** 3)))}


def naive_conv(x, weight, bias):
    """float64 causal depthwise convolution then SiLU, token by token: x [B, T, D], weight [D, 1, W]."""
    W = weight.shape[-1]
    ext = torch.cat([x.new_zeros(x.shape[0], W - 1, x.shape[2]), x], 1)
    y = torch.stack([(ext[:, t:t + W] * weight[:, 0].T).sum(1) for t in range(x.shape[1])], 1)
    return F.silu(y if bias is None else y + bias)


def naive_layer(layer, x):
    """float64 re-derivation of the layer from its parameters and options, step by step (the spec)."""
    P = {n: p.detach().double().cpu() for n, p in layer.named_parameters()}
    x = x.detach().double().cpu()
    B, T, _ = x.shape
    H, Dk, Dv, G = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.num_kv_groups
    heads = lambda t, d, rep: t.view(B, T, -1, d).repeat_interleave(rep, dim=2)
    q, k, v = (x @ P[f"{n}_proj.weight"].T for n in "qkv")
    if layer.use_short_conv:
        q, k, v = (naive_conv(t, P[f"{n}_conv1d.weight"], P.get(f"{n}_conv1d.bias")) for t, n in zip((q, k, v), "qkv"))
    q, k, v = heads(q, Dk, 1), heads(k, Dk, G), heads(v, Dv, G)
    gk = x @ P["gk_proj.0.weight"].T @ P["gk_proj.1.weight"].T + P["gk_proj.1.bias"]
    g = heads(F.logsigmoid(gk) / layer.gate_logit_normalizer, Dk, G)
    if layer.clamp_min is not None:
        g = g.clamp_min(layer.clamp_min)
    if layer.feature_map is not None:
        q, k = ACT[layer.feature_map](q), ACT[layer.feature_map](k)
    S = torch.zeros(B, H, Dk, Dv, dtype=torch.float64)
    o = torch.empty(B, T, H, Dv, dtype=torch.float64)
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * Dk ** -0.5, S)
    norm = layer.g_norm_swish_gate if layer.fuse_norm_and_gate else layer.g_norm
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + norm.eps)
    name = "g_norm_swish_gate.weight" if layer.fuse_norm_and_gate else "g_norm.weight"
    if name in P:
        o = o * P[name]
    if layer.use_output_gate:
        o = o * ACT[layer.gate_fn_name](x @ P["g_proj.weight"].T).view(B, T, H, Dv)
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
@pytest.mark.parametrize("name", ["gqa", "conv_bias_gqa"])
def test_compile_fullgraph_matches_eager(device, name):
    """A decode step (recurrent path, with a cache) and training forward+backward (chunked path)."""
    torch._dynamo.reset()
    layer = make_layer(device, **{**OPTIONS, **FLA_OPTIONS}[name])
    # With the convolution, inductor (torch 2.14) fails to lay out the training graph recompiled
    # for a symbolic T after the decode step ("cannot determine truth value of 1 < s"): static shapes.
    compiled = torch.compile(layer, fullgraph=True, dynamic=False if layer.use_short_conv else None)
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
    if layer.use_short_conv:
        assert all(rel_err(a, b) <= tol(device) for a, b in zip(ca.get_conv_state(0), cb.get_conv_state(0)))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["gqa", "conv_bias_gqa"])
def test_decode_loop_reduce_overhead_matches_eager(name):
    """Prefill, then token-by-token decoding through torch.compile(mode="reduce-overhead"),
    i.e. CUDA graphs replayed every step, against the same loop in eager mode."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    layer = make_layer("cuda", **{**OPTIONS, **FLA_OPTIONS}[name]).eval()
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


def test_fla_parameter_names_per_option():
    """fla's naming: conv modules with use_short_conv, g_norm_swish_gate only for a fused swish gate."""
    def names(**kw):
        return set(dict(make_layer("cpu", **kw).named_parameters()))
    base = names(num_heads=4)
    conv = names(num_heads=4, use_short_conv=True, conv_bias=True)
    assert conv - base == {f"{n}_conv1d.{p}" for n in "qkv" for p in ("weight", "bias")}
    for kw in (dict(fuse_norm=False), dict(gate_fn="silu"), dict(gate_fn="relu"), dict(use_output_gate=False)):
        got = names(num_heads=4, **kw)
        assert "g_norm.weight" in got and "g_norm_swish_gate.weight" not in got, kw
    assert "g_norm.weight" not in names(num_heads=4, elementwise_affine=False, fuse_norm=False)
    layer = make_layer("cpu", num_heads=4, num_kv_heads=2, use_short_conv=True, conv_size=3)
    assert layer.k_conv1d.weight.shape == (16, 1, 3) and layer.q_conv1d.weight.shape == (32, 1, 3)


@pytest.mark.parametrize("name", FLA_OPTIONS)
@pytest.mark.parametrize("chunk", [True, False])
def test_fla_options_match_float64_spec(name, chunk):
    """Every option against the hand-written float64 layer, the layer itself in float64."""
    layer = make_layer("cpu", torch.float64, **FLA_OPTIONS[name])
    x = x_of(2, 70, "cpu", torch.float64)  # > 64 tokens: eval mode also runs the chunked kernels
    o, _ = run(layer, x, chunk)
    assert rel_err(o, naive_layer(layer, x)) <= TOL[torch.float64]


@pytest.mark.parametrize("name", ["conv", "conv_bias_gqa", "fused_chunk_everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_prefill_then_decode_matches_full(name, dtype):
    """The convolution states ride in the GLACache: prefill + steps = one pass; steps keep their addresses."""
    layer = make_layer("cpu", dtype, **FLA_OPTIONS[name])
    x = x_of(2, 30, "cpu", dtype)
    full, _ = run(layer, x)
    prompt, cache = run(layer, x[:, :2], use_cache=True)  # shorter than the convolution
    conv = cache.get_conv_state(0)
    assert [tuple(c.shape) for c in conv] == [(2, m.hidden_size, layer.conv_size)
                                              for m in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)]
    assert all(c.dtype == dtype for c in conv)
    prompt2, cache = run(layer, x[:, 2:20], past_key_values=cache, use_cache=True)
    conv, state = cache.get_conv_state(0), cache[0]
    steps = [run(layer, x[:, t:t + 1], chunk=False, past_key_values=cache, use_cache=True)[0]
             for t in range(20, 30)]
    assert all(a is b for a, b in zip(cache.get_conv_state(0), conv)) and cache[0] is state
    assert cache.get_seq_length() == 30
    assert rel_err(torch.cat([prompt, prompt2] + steps, 1), full) <= tol("cpu", dtype)


@pytest.mark.parametrize("chunk", [True, False])
def test_conv_left_padded_batch_matches_unbatched(chunk):
    """Padding (and holes) in the mask are skipped by the convolution too, in prefill and decode."""
    layer = make_layer("cpu", **FLA_OPTIONS["conv_bias_gqa"])
    lengths, T, steps = [11, 2, 6], 11, 3
    xs = [x_of(1, n + steps, "cpu", seed=30 + i) for i, n in enumerate(lengths)]
    prompt = torch.stack([F.pad(x[0, :n], (0, 0, T - n, 0), value=3.0) for x, n in zip(xs, lengths)])
    mask = torch.stack([(torch.arange(T) >= T - n).long() for n in lengths])
    o, cache = run(layer, prompt, chunk, attention_mask=mask, use_cache=True)
    outs = [o]
    for t in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(lengths), 1)], 1)
        token = torch.cat([x[:, n + t:n + t + 1] for x, n in zip(xs, lengths)])
        outs.append(run(layer, token, False, attention_mask=mask, past_key_values=cache, use_cache=True)[0])
    out = torch.cat(outs, 1)
    for i, (x, n) in enumerate(zip(xs, lengths)):
        ref, ref_cache = run(layer, x, chunk, use_cache=True)
        assert rel_err(out[i:i + 1, T - n:], ref) <= tol("cpu")
        for a, b in zip(cache.get_conv_state(0), ref_cache.get_conv_state(0)):
            assert rel_err(a[i:i + 1], b) <= tol("cpu")


def test_conv_cu_seqlens_matches_unbatched():
    layer = make_layer("cpu", **FLA_OPTIONS["conv"])
    lengths = [7, 0, 2, 12]
    xs = [x_of(1, n, "cpu", seed=40 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0] + lengths).cumsum(0)
    o, cache = run(layer, torch.cat(xs, 1), cu_seqlens=cu, use_cache=True)
    o2, cache = run(layer, torch.cat(xs, 1), cu_seqlens=cu, past_key_values=cache, use_cache=True)
    for i, x in enumerate(xs):
        ref, ref_cache = run(layer, x, use_cache=True)
        ref2, ref_cache = run(layer, x, past_key_values=ref_cache, use_cache=True)
        assert rel_err(o[:, cu[i]:cu[i + 1]], ref) <= tol("cpu")
        assert rel_err(o2[:, cu[i]:cu[i + 1]], ref2) <= tol("cpu")
        for a, b in zip(cache.get_conv_state(0), ref_cache.get_conv_state(0)):
            assert rel_err(a[i:i + 1], b) <= tol("cpu")


@pytest.mark.parametrize("name", ["conv_bias_gqa", "fused_chunk_everything"])
def test_fla_option_gradients_reach_every_parameter(name):
    layer = make_layer("cpu", **FLA_OPTIONS[name]).train()
    x = x_of(2, 17, "cpu").requires_grad_()
    layer(x)[0].pow(2).sum().backward()
    for n, p in list(layer.named_parameters()) + [("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_constructor_rejects_what_fla_cannot_run():
    G = gla_cuda.GatedLinearAttention
    with pytest.raises(ValueError, match="feature_map must be one of"):
        G(hidden_size=64, feature_map="elu")
    with pytest.raises(ValueError, match="gate_fn must be one of"):
        G(hidden_size=64, gate_fn="bias_gelu")  # fla's needs a bias argument: it fails when called
    with pytest.raises(ValueError, match=r"hidden_size \* expand_k must be a positive integer"):
        G(hidden_size=64, expand_k=0.3)
    with pytest.raises(ValueError, match="conv_size must be a positive int"):
        G(hidden_size=64, use_short_conv=True, conv_size=0)
    with pytest.raises(TypeError):
        G("chunk", 64, 0.5, 1.0, 4, None, None, False, 4, False, True, "swish", True, 1e-5, 16, 16, None, True,
          0, "cuda")  # backend is keyword-only: positions are fla's


def test_input_validation_names_the_argument():
    layer = make_layer("cpu", **FLA_OPTIONS["conv_bias_gqa"])
    x = x_of(2, 5, "cpu")
    cases = [
        (dict(hidden_states=x[..., :32]), ValueError, r"hidden_states must be \[B, T, hidden_size\] with hidden_size=64, got shape \(2, 5, 32\)"),
        (dict(hidden_states=x[0]), ValueError, "hidden_states must be \\[B, T, hidden_size\\]"),
        (dict(hidden_states=x.double()), TypeError, "hidden_states must have the layer's parameter dtype torch.float32"),
        (dict(hidden_states=x.to("meta")), ValueError, "hidden_states is on meta but the layer's parameters are on cpu"),
        (dict(hidden_states=x.numpy()), TypeError, "hidden_states must be a Tensor"),
        (dict(attention_mask=torch.ones(2, 4)), ValueError, "attention_mask must be \\[B, T'\\]"),
        (dict(attention_mask=torch.ones(3, 5)), ValueError, "attention_mask must be"),
        (dict(attention_mask=torch.zeros(2, 5)), TypeError, "attention_mask must be a bool or integer"),
        (dict(attention_mask=[[1] * 5] * 2), TypeError, "attention_mask must be a Tensor"),
        (dict(cu_seqlens=torch.tensor([0, 5])), ValueError, "batch size 1"),
        (dict(past_key_values={}), TypeError, "past_key_values must be a gla_cuda.GLACache, fla's cache"),
        (dict(use_cache="yes"), TypeError, "use_cache must be a bool"),
    ]
    for kw, exc, match in cases:
        kw = {"hidden_states": x, **kw}
        with pytest.raises(exc, match=match):
            layer(**kw)
    x1 = x[:1]
    for cu, match in ((torch.tensor([0, 5.0]), "int32 or int64"), (torch.tensor([0, 4]), "end at the packed length"),
                      (torch.tensor([1, 5]), "start at 0"), (torch.tensor([0, 3, 2, 5]), "non-decreasing")):
        with pytest.raises((TypeError, ValueError), match=match):
            layer(x1, cu_seqlens=cu)
    with pytest.raises(ValueError, match="pass either attention_mask or cu_seqlens"):
        layer(x1, attention_mask=torch.ones(1, 5, dtype=torch.bool), cu_seqlens=torch.tensor([0, 5]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs the projections in bfloat16
        o, _ = layer(x.bfloat16())
        with pytest.raises(TypeError, match="under torch.autocast: float16, bfloat16 or float32"):
            layer(x.double())  # autocast never casts float64
    assert o.shape == x.shape and o.dtype == torch.bfloat16


def test_rejected_call_leaves_the_cache_untouched():
    layer = make_layer("cpu", **FLA_OPTIONS["conv"])
    x = x_of(2, 6, "cpu")
    with torch.no_grad():
        _, cache = layer(x, use_cache=True)
    snapshot = lambda: [cache[0].clone()] + [c.clone() for c in cache.get_conv_state(0)] + [cache.get_seq_length()]
    before = snapshot()
    bad = [dict(hidden_states=x[:, :1, :32]), dict(hidden_states=x[:, :1].double()),
           dict(hidden_states=x[:1, :1]),  # one row against a cache of two
           dict(hidden_states=x[:, :1], attention_mask=torch.ones(2, 1)),
           dict(hidden_states=x[:, :1], attention_mask=torch.ones(1, 1, dtype=torch.bool))]
    for kw in bad:
        with pytest.raises((TypeError, ValueError)):
            with torch.no_grad():
                layer(past_key_values=cache, use_cache=True, **kw)
    after = snapshot()
    assert after[-1] == before[-1] and all(torch.equal(a, b) for a, b in zip(after[:-1], before[:-1]))

    # a conv state of the wrong shape is named, and nothing runs
    cache.conv_states[0] = (cache.get_conv_state(0)[0][..., :3],) + cache.get_conv_state(0)[1:]
    with pytest.raises(ValueError, match=r"cache conv state of layer 0 \(q\) must have shape \[N, D, W\] = \(2, 32, 4\)"):
        layer(x[:, :1], past_key_values=cache, use_cache=True)
    plain = make_layer("cpu", num_heads=4)
    with pytest.raises(ValueError, match="the layer has no short convolution"):
        plain(x[:, :1], past_key_values=cache)
