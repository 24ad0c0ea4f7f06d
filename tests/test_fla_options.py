"""fla-core 0.6.0 keyword parity of chunk_gla / fused_recurrent_gla: state_v_first, gk, gv,
reverse, cu_seqlens_cpu (gla_cuda/fla_options.py)."""
import inspect

import pytest
import torch

import gla_cuda
from conftest import DEVICES, TOL, make_inputs, oracle, rel_err

B, T, H, K, V = 2, 9, 2, 16, 24

# fla-core 0.6.0's parameters (fla/ops/gla/chunk.py and fused_recurrent.py)
FLA_CHUNK = ["q", "k", "v", "g", "scale", "initial_state", "output_final_state", "state_v_first",
             "cu_seqlens", "cu_seqlens_cpu"]
FLA_RECURRENT = ["q", "k", "v", "gk", "gv", "scale", "initial_state", "output_final_state", "reverse",
                 "state_v_first", "cu_seqlens"]


def test_every_fla_keyword_is_accepted():
    assert set(FLA_CHUNK) <= set(inspect.signature(gla_cuda.chunk_gla).parameters)
    assert set(FLA_RECURRENT) <= set(inspect.signature(gla_cuda.fused_recurrent_gla).parameters)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [gla_cuda.chunk_gla, gla_cuda.fused_recurrent_gla])
def test_state_v_first(device, fn):
    ins = make_inputs(B, T, H, K, V, device=device, h0=True)
    h0 = ins.pop("initial_state")
    o, ht = fn(**ins, initial_state=h0.transpose(-1, -2).contiguous(), output_final_state=True,
               state_v_first=True)
    ref_o, ref_ht = oracle({**ins, "initial_state": h0})
    assert ht.shape == (B, H, V, K)
    assert rel_err(o, ref_o) <= TOL[torch.float32]
    assert rel_err(ht.transpose(-1, -2), ref_ht) <= TOL[torch.float32]
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, V, K\]"):
        fn(**ins, initial_state=h0, state_v_first=True)


def test_gk_alias_and_no_gate():
    ins = make_inputs(B, T, H, K, V)
    g = ins.pop("g")
    o, _ = gla_cuda.fused_recurrent_gla(ins["q"], ins["k"], ins["v"], gk=g)
    assert rel_err(o, oracle({**ins, "g": g})[0]) <= TOL[torch.float32]
    o, _ = gla_cuda.fused_recurrent_gla(**ins)
    assert rel_err(o, oracle({**ins, "g": torch.zeros_like(g)})[0]) <= TOL[torch.float32]
    with pytest.raises(TypeError, match="not both"):
        gla_cuda.fused_recurrent_gla(**ins, g=g, gk=g)


def _flip(ins, lens):
    """Every sequence of a packed batch reversed."""
    out, s = {}, 0
    for n, x in ins.items():
        parts, s = [], 0
        for L in lens:
            parts.append(x[:, s:s + L].flip(1))
            s += L
        out[n] = torch.cat(parts, 1)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True])
def test_reverse(device, varlen):
    lens = [5, 0, 11] if varlen else [T] * B
    ins = make_inputs(1 if varlen else B, sum(lens) if varlen else T, H, K, V, device=device, h0=True,
                      N=len(lens) if varlen else None)
    cu = torch.tensor([0, 5, 5, 16], device=device) if varlen else None
    o, ht = gla_cuda.fused_recurrent_gla(**ins, output_final_state=True, reverse=True, cu_seqlens=cu)
    if varlen:
        flipped = _flip({n: x for n, x in ins.items() if n != "initial_state"}, lens)
        ref_o, ref_ht = oracle({**flipped, "initial_state": ins["initial_state"]}, cu_seqlens=cu)
        ref_o = _flip({"o": ref_o}, lens)["o"]
    else:
        flipped = {n: (x.flip(1) if n != "initial_state" else x) for n, x in ins.items()}
        ref_o, ref_ht = oracle(flipped)
        ref_o = ref_o.flip(1)
    assert rel_err(o, ref_o) <= TOL[torch.float32]
    assert rel_err(ht, ref_ht) <= TOL[torch.float32]


def _gv_closed_form(q, k, v, gk, gv, scale, h0, reverse):
    """o_t = scale * q_t S_t with S_t written out as a sum over earlier tokens (float64)."""
    q, k, v, gk, gv, h0 = (x.double().cpu() for x in (q, k, v, gk, gv, h0))
    Bn, Tn = q.shape[:2]
    order = list(reversed(range(Tn))) if reverse else list(range(Tn))
    o = torch.zeros(Bn, Tn, H, V, dtype=torch.float64)
    for b in range(Bn):
        for i, t in enumerate(order):
            seen = order[:i + 1]
            S = h0[b] * gk[b, seen].sum(0).exp()[:, :, None] * gv[b, seen].sum(0).exp()[:, None, :]
            for j, s in enumerate(seen):
                later = seen[j + 1:]
                ak = gk[b, later].sum(0).exp() if later else torch.ones(H, K, dtype=torch.float64)
                av = gv[b, later].sum(0).exp() if later else torch.ones(H, V, dtype=torch.float64)
                S = S + (k[b, s] * ak)[:, :, None] * (v[b, s] * av)[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
    return o


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_gv_against_closed_form_with_gradients(device, reverse):
    ins = make_inputs(B, 6, H, K, V, device=device, h0=True)
    gv = torch.nn.functional.logsigmoid(torch.randn(B, 6, H, V, device=device)) / 4
    o, ht = gla_cuda.fused_recurrent_gla(ins["q"], ins["k"], ins["v"], gk=ins["g"], gv=gv,
                                         initial_state=ins["initial_state"], output_final_state=True,
                                         reverse=reverse)
    ref = _gv_closed_form(ins["q"], ins["k"], ins["v"], ins["g"], gv, K ** -0.5, ins["initial_state"], reverse)
    assert rel_err(o, ref) <= TOL[torch.float32]
    assert gla_cuda.explain_backend(ins["q"], ins["k"], ins["v"], ins["g"], op="recurrent_gv_fwd").backend \
        == "reference"
    # gv = 0: the same values and gradients as the usual op (compiled/Triton/reference)
    leaves = {n: x.clone().requires_grad_() for n, x in ins.items()}
    o1, ht1 = gla_cuda.fused_recurrent_gla(**leaves, output_final_state=True, reverse=reverse,
                                           gv=torch.zeros_like(gv))
    (o1.square().sum() + ht1.sum()).backward()
    grads1 = [x.grad for x in leaves.values()]
    leaves = {n: x.clone().requires_grad_() for n, x in ins.items()}
    o2, ht2 = gla_cuda.fused_recurrent_gla(**leaves, output_final_state=True, reverse=reverse)
    (o2.square().sum() + ht2.sum()).backward()
    for a, b in zip(grads1, [x.grad for x in leaves.values()]):
        assert rel_err(a, b) <= TOL[torch.float32]


def test_gv_bad_arguments():
    ins = make_inputs(B, T, H, K, V)
    with pytest.raises(ValueError, match="gv must have v's shape"):
        gla_cuda.fused_recurrent_gla(**ins, gv=torch.zeros(B, T, H, K))
    with pytest.raises(RuntimeError, match="recurrent_gv_fwd"):
        gla_cuda.fused_recurrent_gla(**ins, gv=torch.zeros(B, T, H, V), backend="triton")
