"""gla_cuda inside flash-linear-attention (fla 0.6.0) models: fla's checkpoints load into our layer
in every configuration, fla's cache works, use_gla_cuda converts a GLAForCausalLM keeping its
weights, and generation and save_pretrained/from_pretrained round-trip.

Needs the optional test dependencies flash-linear-attention and transformers (skipped without).
On a CPU-only machine fla's Triton kernels (its MLP, norms and its own GLA layer) run under the
Triton interpreter (TRITON_INTERPRET=1, conftest), with one configuration per autotuned kernel:
the autotuner's timing needs a GPU driver. The side-by-side comparisons with fla's own layer
and model run on both; CUDA adds bfloat16 and longer inputs.
"""
import copy

import pytest
import torch

pytest.importorskip("fla", reason="flash-linear-attention is not installed (an optional test dependency)")
pytest.importorskip("transformers", reason="transformers is not installed (an optional test dependency)")

import gla_cuda  # noqa: E402
from gla_cuda.integrations.fla import from_fla, use_gla_cuda  # noqa: E402
from gla_cuda.integrations import fla as integration  # noqa: E402
from conftest import FLA_DEVICES as DEVICES, HAS_CUDA, TOL, rel_err  # noqa: E402
from test_layer import FLA_OPTIONS, HIDDEN, naive_layer, x_of  # noqa: E402

from fla.layers import GatedLinearAttention as FLAGatedLinearAttention  # noqa: E402
from fla.models import GLAConfig, GLAForCausalLM  # noqa: E402
from fla.models.utils import Cache  # noqa: E402

ALL_OPTIONS = {"default": dict(num_heads=4), **FLA_OPTIONS}
# fla's Triton kernels take CPU tensors only under the interpreter, which conftest chooses on
# CPU-only machines (DEVICES: cpu there, cuda with a GPU); conftest's fixture prepares it.
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("fla_kernels_on_cpu")


def fla_layer(device="cpu", dtype=torch.float32, seed=0, **kw):
    """fla's own layer with random parameters (norm weights away from 1, so a wrong norm shows)."""
    torch.manual_seed(seed)
    layer = FLAGatedLinearAttention(hidden_size=HIDDEN, layer_idx=0, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return layer.to(device, dtype).eval()


def tiny_config(**kw):
    base = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=97, hidden_ratio=2,
                fuse_cross_entropy=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GLAConfig(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = GLAForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # larger logits than the tiny default init: clear argmax margins
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(10)
    return model


def tol(device, dtype):
    return 2e-4 if (device == "cpu" and dtype == torch.float32) else TOL[dtype]


# ----------------------------------------------------------------------------- layer


@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_every_option_loads_strictly_and_computes_the_layer(name):
    """fla's state_dict loads strictly into gla_cuda.GatedLinearAttention built with the same
    arguments; the result equals the float64 spec and from_fla gives the same layer."""
    theirs = fla_layer(**ALL_OPTIONS[name])
    ours = gla_cuda.GatedLinearAttention(hidden_size=HIDDEN, layer_idx=0, **ALL_OPTIONS[name]).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(dict(ours.named_parameters())) == list(dict(theirs.named_parameters()))
    converted = from_fla(theirs)
    assert type(converted) is integration.GatedLinearAttention and not converted.training
    for (n, p), (m, q) in zip(converted.named_parameters(), theirs.named_parameters()):
        assert n == m and p is q  # the very same tensors
    x = x_of(2, 20, "cpu")
    with torch.no_grad():
        o, _ = ours(x)
        o2, none, _ = converted(x)
    assert none is None and torch.equal(o, o2)
    assert rel_err(o, naive_layer(ours, x)) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_outputs_agree_with_fla_layer(device, name):
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    lengths = [20] + ([200] if device == "cuda" and "fused_chunk" not in name else [])  # fla: fused_chunk gone
    for dtype in dtypes:
        theirs = fla_layer(device, dtype, **ALL_OPTIONS[name])
        ours = from_fla(copy.deepcopy(theirs))
        for T in lengths:
            x = x_of(2, T, device, dtype)
            with torch.no_grad():
                ref, _, _ = theirs(x)
                o, _, _ = ours(x)
            assert rel_err(o, ref) <= tol(device, dtype), (dtype, T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["default", "conv", "conv_bias_gqa"])
def test_fla_cache_prefill_decode_side_by_side(device, name):
    """Our layer keeps fla's cache in fla's layout: after a prefill and each decoding step, its
    outputs and states equal fla's; and a cache fla's layer filled continues in ours."""
    theirs = fla_layer(device, **ALL_OPTIONS[name])
    ours = from_fla(copy.deepcopy(theirs))
    x = x_of(2, 12, device)
    ca, cb, cc = Cache(), Cache(), Cache()
    with torch.no_grad():
        full, _, _ = ours(x)
        a, _, ca = ours(x[:, :7], past_key_values=ca, use_cache=True)
        b, _, cb = theirs(x[:, :7], past_key_values=cb, use_cache=True)
        _, _, cc = theirs(x[:, :7], past_key_values=cc, use_cache=True)  # fla's prefill, our decode
        outs, mixed = [a], [a]
        for t in range(7, 12):
            a, _, ca = ours(x[:, t:t + 1], past_key_values=ca, use_cache=True)
            b, _, cb = theirs(x[:, t:t + 1], past_key_values=cb, use_cache=True)
            c, _, cc = ours(x[:, t:t + 1], past_key_values=cc, use_cache=True)
            assert rel_err(a, b) <= tol(device, torch.float32), t
            outs.append(a)
            mixed.append(c)
    assert rel_err(torch.cat(outs, 1), full) <= tol(device, torch.float32)
    assert rel_err(torch.cat(mixed, 1), full) <= tol(device, torch.float32)
    sa, sb = ca[0], cb[0]
    H, K, V = ours.num_heads, ours.head_k_dim, ours.head_v_dim
    assert sa["recurrent_state"].shape == (2, H, V, K) and sa["recurrent_state"].dtype == torch.float32
    assert rel_err(sa["recurrent_state"], sb["recurrent_state"]) <= tol(device, torch.float32)
    assert ca.get_seq_length() == cb.get_seq_length() == 12
    if ours.use_short_conv:
        for p, q in zip(sa["conv_state"], sb["conv_state"]):
            assert p.shape == q.shape and p.dtype == q.dtype and rel_err(p, q) <= 1e-6
    else:
        assert sa["conv_state"] is None


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("kw", [dict(), dict(use_short_conv=True, num_kv_heads=1, fuse_norm=False)],
                         ids=["default", "conv_gqa_unfused"])
def test_conversion_keeps_every_weight_bitwise(kw):
    model = tiny_model(**kw)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    assert use_gla_cuda(model) is model
    attn = [m.attn for m in model.model.layers]
    assert all(type(a) is integration.GatedLinearAttention for a in attn)
    assert not any(isinstance(m, FLAGatedLinearAttention) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[n], before[n]) and after[n].dtype == before[n].dtype for n in before)
    assert all(p is params[n] for n, p in model.named_parameters())  # an optimizer keeps working
    assert use_gla_cuda(model) is model  # converting again changes nothing


@pytest.mark.parametrize("kw", [dict(), dict(use_short_conv=True, num_kv_heads=1)], ids=["default", "conv_gqa"])
def test_greedy_generation_equals_argmax_of_full_forward(kw):
    """generate() through fla's cache, left-padded batch: each new token is the argmax of the
    converted model's own full-sequence forward, and each row equals its unpadded generation."""
    model = use_gla_cuda(tiny_model(**kw).to(DEVICE))
    prompt = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(prompt)
    prompt[1, :4], mask[1, :4] = 0, 0  # row 1: a 5-token prompt, left-padded
    new = 8
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
        full_mask = torch.cat([mask, mask.new_ones(2, new)], 1)
        logits = model(out, attention_mask=full_mask).logits
        alone = model.generate(prompt[1:, 4:], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape == (2, 9 + new)
    logits[..., model.config.eos_token_id] = -torch.inf  # min_new_tokens keeps generate() from ending
    assert torch.equal(out[:, 9:], logits[:, 8:-1].argmax(-1))
    assert torch.equal(out[1, 9:], alone[0, 5:])


def test_generation_agrees_with_fla_model():
    """The converted model and fla's: same logits, same greedy tokens (float32)."""
    device = DEVICE
    theirs = tiny_model(use_short_conv=True).to(device)
    ours = use_gla_cuda(copy.deepcopy(theirs))
    ids = torch.randint(3, 97, (2, 70 if HAS_CUDA else 12), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, theirs(ids).logits) <= tol(device, torch.float32)
        a = ours.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        b = theirs.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_save_pretrained_round_trip(tmp_path):
    """The converted model saves an fla checkpoint: same keys and tensors; fla loads it, and
    converting the loaded model gives the same outputs."""
    model = use_gla_cuda(tiny_model(use_short_conv=True))
    model.save_pretrained(tmp_path)
    loaded = GLAForCausalLM.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert any(isinstance(m, FLAGatedLinearAttention) for m in loaded.modules())
    use_gla_cuda(loaded)
    model, loaded = model.to(DEVICE), loaded.to(DEVICE)
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_use_gla_cuda_on_a_layer_and_bad_arguments():
    theirs = fla_layer(num_heads=4)
    ours = use_gla_cuda(theirs)  # a bare layer cannot be swapped in place: its replacement comes back
    assert type(ours) is integration.GatedLinearAttention
    tree = torch.nn.ModuleDict({"a": fla_layer(num_heads=4), "b": torch.nn.Linear(2, 2)})
    use_gla_cuda(tree)
    assert type(tree["a"]) is integration.GatedLinearAttention and type(tree["b"]) is torch.nn.Linear
    with pytest.raises(TypeError, match="layer must be fla.layers.GatedLinearAttention"):
        from_fla(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="past_key_values must be a gla_cuda.GLACache, fla's cache"):
        ours(x_of(1, 3, "cpu"), past_key_values=[{}])
