"""Run flash-linear-attention (fla) GLA models on gla_cuda's kernels.

    from gla_cuda.integrations.fla import use_gla_cuda
    model = use_gla_cuda(GLAForCausalLM.from_pretrained(path))   # in place; weights kept

use_gla_cuda swaps every ``fla.layers.GatedLinearAttention`` in a module tree for this module's
GatedLinearAttention: gla_cuda's layer (same constructor, parameters and state_dict keys) with
fla's call convention, returning (output, None, past_key_values), so fla's blocks, fla's cache
and ``generate()`` work unchanged. The swapped model's state_dict has the same keys and tensors,
so ``save_pretrained`` writes a checkpoint fla loads as is.

fla (flash-linear-attention) is imported only inside use_gla_cuda / from_fla.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gla_cuda import layers

__all__ = ["GatedLinearAttention", "use_gla_cuda", "from_fla"]


class GatedLinearAttention(layers.GatedLinearAttention):
    """gla_cuda.GatedLinearAttention called as fla's layer is: forward(hidden_states,
    attention_mask, past_key_values, use_cache, output_attentions, **kwargs) returns
    (output, None, past_key_values); cu_seqlens comes in kwargs, other kwargs are ignored
    (fla's blocks pass the model's keyword arguments down to every layer)."""

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        o, past_key_values = super().forward(hidden_states, attention_mask, past_key_values, use_cache,
                                             cu_seqlens=kwargs.get("cu_seqlens"))
        return o, None, past_key_values


def _fla_layer_class():
    try:
        from fla.layers.gla import GatedLinearAttention as FLAGatedLinearAttention
    except ImportError as e:
        raise ImportError("gla_cuda.integrations.fla needs flash-linear-attention "
                          "(pip install flash-linear-attention)") from e
    return FLAGatedLinearAttention


def _activation_name(fn, what: str) -> str:
    from fla.modules.activations import ACT2FN
    names = [name for name, f in ACT2FN.items() if f is fn]
    if not names:
        raise ValueError(f"the fla layer's {what} is not one of fla's named activations: {fn!r}")
    return "swish" if "swish" in names else names[0]


def fla_layer_arguments(layer: nn.Module) -> dict:
    """The constructor arguments an fla GatedLinearAttention was built with, read back from it."""
    norm = layer.g_norm_swish_gate if layer.fuse_norm_and_gate else layer.g_norm
    if layer.fuse_norm_and_gate:
        gate_fn = "swish"
    elif layer.use_output_gate:
        gate_fn = _activation_name(layer.gate_fn, "gate_fn")
    else:
        gate_fn = "swish"  # unused without an output gate
    feature_map = (None if layer.feature_map_fn is None
                   else _activation_name(layer.feature_map_fn, "feature_map"))
    conv_bias = bool(layer.use_short_conv and layer.q_conv1d.bias is not None)
    return dict(mode=layer.mode, hidden_size=layer.hidden_size, expand_k=layer.expand_k,
                expand_v=layer.expand_v, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
                feature_map=feature_map, use_short_conv=layer.use_short_conv, conv_size=layer.conv_size,
                conv_bias=conv_bias, use_output_gate=layer.use_output_gate, gate_fn=gate_fn,
                elementwise_affine=norm.weight is not None, norm_eps=norm.eps,
                gate_logit_normalizer=layer.gate_logit_normalizer,
                gate_low_rank_dim=layer.gk_proj[0].out_features, clamp_min=layer.clamp_min,
                fuse_norm=layer.fuse_norm_and_gate, layer_idx=layer.layer_idx)


def from_fla(layer: nn.Module, backend: Optional[str] = None) -> GatedLinearAttention:
    """gla_cuda's layer in place of one fla GatedLinearAttention: same arguments, and the very
    same parameter tensors (not copies: bitwise equal, same device, dtype and requires_grad, and
    an optimizer holding them keeps working); training/eval mode kept."""
    fla_cls = _fla_layer_class()
    if not isinstance(layer, fla_cls):
        raise TypeError(f"layer must be fla.layers.GatedLinearAttention, got {type(layer).__name__}")
    with torch.device("meta"):  # no memory: every tensor is replaced by the fla layer's own
        ours = GatedLinearAttention(**fla_layer_arguments(layer), backend=backend)
    ours.load_state_dict(layer.state_dict(keep_vars=True), strict=True, assign=True)
    return ours.train(layer.training)


def use_gla_cuda(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Swaps every fla GatedLinearAttention inside model (a GLAForCausalLM, GLAModel, or any
    module tree) for gla_cuda's, in place, keeping the parameters themselves (from_fla), and
    returns model. Given an fla layer itself, returns its replacement. backend: gla_cuda's
    kernels (gla_cuda.dispatch; None: $GLA_BACKEND or auto)."""
    fla_cls = _fla_layer_class()
    if isinstance(model, fla_cls):
        return from_fla(model, backend)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, fla_cls)]
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, from_fla(m, backend))
    return model
