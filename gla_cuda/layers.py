"""GatedLinearAttention: the GLA token-mixing layer (as in fla's ``fla.layers.GatedLinearAttention``)
and GLACache, the per-layer recurrent states kept between generation steps.

The constructor takes every argument of fla 0.6.0's layer with the same meaning, and the
submodules carry fla's names (q_proj, k_proj, v_proj, q_conv1d/k_conv1d/v_conv1d, gk_proj,
g_proj, g_norm_swish_gate or g_norm, o_proj), so a state_dict of fla's layer in any
configuration loads strictly. ``past_key_values`` may be a GLACache or fla's own cache
(``fla.models.utils.Cache``), which keeps states in fla's layout (see _FLACacheView).
gla_cuda.integrations.fla swaps these layers into fla's models.
"""
from __future__ import annotations

import math
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gla_cuda import dispatch, distributed, fla_options
from gla_cuda.api import _check_cu_seqlens, chunk_gla, fused_recurrent_gla, fused_recurrent_gla_pooled
from gla_cuda.backends import cuda as cuda_backend
from gla_cuda.conv import ShortConvolution

# "fused_chunk" is fla's name for another kernel of the same chunked computation; it runs chunk_gla.
_MODES = ("chunk", "fused_recurrent", "fused_chunk")


def _sqrelu(x: Tensor) -> Tensor:
    return F.relu(x.to(torch.promote_types(x.dtype, torch.float32))).square().to(x.dtype)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# The activations fla's layer accepts by name for feature_map and gate_fn, with fla's meaning
# (fla's "gelu" is the tanh approximation; "sqrelu" is relu(x)^2 computed in float32).
ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "silu": F.silu,
               "swish": F.silu, "sqrelu": _sqrelu, "gelu": _gelu_tanh}


def _activation(name: Optional[str], arg: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"{arg} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class GLACache:
    """Recurrent states for generation, per layer_idx: one float32 [N, H, K, V] tensor and, for
    layers with use_short_conv, the (q, k, v) convolution states, each [N, D, W] (the last W
    inputs, gla_cuda.conv)."""

    def __init__(self) -> None:
        self.states: List[Optional[Tensor]] = []
        self.conv_states: List[Optional[Tuple[Tensor, Tensor, Tensor]]] = []
        self.seen_tokens: List[int] = []

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> Optional[Tensor]:
        return self.states[layer_idx] if layer_idx < len(self.states) else None

    def get_conv_state(self, layer_idx: int) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        return self.conv_states[layer_idx] if layer_idx < len(self.conv_states) else None

    def update(self, state: Tensor, layer_idx: int, offset: int = 0,
               conv_state: Optional[Sequence[Tensor]] = None) -> None:
        """Stores layer_idx's state (and conv_state, if given) after ``offset`` more tokens.
        Decoding steps advance stored states in place; their addresses never change, so
        torch.compile's CUDA graphs (mode="reduce-overhead") can replay a decoding step."""
        while len(self.states) <= layer_idx:
            self.states.append(None)
            self.conv_states.append(None)
            self.seen_tokens.append(0)
        if not torch.compiler.is_compiling():
            old = [self.states[layer_idx]] + list(self.conv_states[layer_idx] or ())
            for t in [state] + list(conv_state or ()):
                if isinstance(t, Tensor) and t.is_cuda and not any(t is o for o in old):
                    torch._dynamo.mark_static_address(t)
        self.states[layer_idx] = state
        if conv_state is not None:
            self.conv_states[layer_idx] = tuple(conv_state)
        self.seen_tokens[layer_idx] += offset

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens[layer_idx] if layer_idx < len(self.seen_tokens) else 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the states of the selected batch rows."""
        pick = lambda s: s.index_select(0, beam_idx.to(s.device))  # noqa: E731
        self.states = [None if s is None else pick(s) for s in self.states]
        self.conv_states = [None if c is None else tuple(pick(s) for s in c) for c in self.conv_states]


def is_fla_cache(obj) -> bool:
    """Whether obj is fla's cache (fla.models.utils.Cache / FLACache / LegacyFLACache), found
    without importing fla (an optional dependency)."""
    return any(c.__module__.split(".")[0] == "fla" and c.__name__ in ("FLACache", "LegacyFLACache")
               for c in type(obj).__mro__)


class _GLACacheView:
    """A layer's entry of a GLACache: state [N, H, K, V]."""
    v_first = False

    def __init__(self, cache: GLACache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    def read(self):
        return self.cache[self.layer_idx], self.cache.get_conv_state(self.layer_idx)

    def write(self, state, conv_state, offset):
        self.cache.update(state, self.layer_idx, offset, conv_state=conv_state)


class _FLACacheView:
    """A layer's entry of fla's cache, in fla 0.6.0's layout: a dict with "recurrent_state",
    float32 [N, H, V, K] (V first), and "conv_state", a (q, k, v) tuple of [N, D, W] tensors."""
    v_first = True

    def __init__(self, cache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    def read(self):
        if len(self.cache) <= self.layer_idx:
            return None, None
        entry = self.cache[self.layer_idx]
        if entry is None:
            return None, None
        if not isinstance(entry, dict):
            raise TypeError(f"past_key_values[{self.layer_idx}] must be fla's state dict, "
                            f"got {type(entry).__name__}")
        conv = entry.get("conv_state")
        if isinstance(conv, (tuple, list)) and all(c is None for c in conv):
            conv = None  # fla stores (None, None, None) after a call without use_cache
        return entry.get("recurrent_state"), conv

    def write(self, state, conv_state, offset):
        self.cache.update(recurrent_state=state, conv_state=conv_state, layer_idx=self.layer_idx,
                          offset=offset)


class RMSNormGated(nn.Module):
    """y = RMSNorm(x) * weight * act(gate) over the last dim, computed in float32
    (fla's FusedRMSNormGated; act is swish, or no gate at all when gate is None)."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.hidden_size, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        # One fused Triton kernel on CUDA (forward and backward), the PyTorch math elsewhere.
        return torch.ops.gla.rms_norm_gated(x, gate, self.weight, self.eps, "auto")

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class GatedLinearAttention(nn.Module):
    """Gated linear attention layer (Yang et al., 2024), hidden_states [B, T, hidden_size] in and out.

    q, k, v are projections of x (with use_short_conv, each then passes a causal depthwise
    convolution of width conv_size and SiLU); the forget gate is a low-rank projection
    g = logsigmoid(W2 W1 x) / gate_logit_normalizer (optionally clamped below at clamp_min);
    feature_map, if given, applies to q and k. num_kv_heads < num_heads shares each k/v/gate
    head among num_heads // num_kv_heads query heads. The attention output is normalised per
    head by RMSNorm (a weight unless elementwise_affine is false) and, with use_output_gate,
    multiplied by gate_fn(g_proj(x)).

    Arguments are fla 0.6.0's, in its order: mode ("chunk", "fused_recurrent"; "fused_chunk"
    runs the chunked kernels), fuse_norm (with gate_fn "swish", the norm and the gate are one
    module, g_norm_swish_gate, else g_norm: it decides the parameter names, the computation is
    the same). backend (keyword only, not fla's) picks gla_cuda's kernels (gla_cuda.dispatch).
    """

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 0.5,
                 expand_v: float = 1.0, num_heads: int = 4, num_kv_heads: Optional[int] = None,
                 feature_map: Optional[str] = None, use_short_conv: bool = False, conv_size: int = 4,
                 conv_bias: bool = False, use_output_gate: bool = True, gate_fn: str = "swish",
                 elementwise_affine: Optional[bool] = True, norm_eps: float = 1e-5,
                 gate_logit_normalizer: float = 16, gate_low_rank_dim: int = 16,
                 clamp_min: Optional[float] = None, fuse_norm: bool = True,
                 layer_idx: Optional[int] = None, *, backend: Optional[str] = None,
                 cp_group=None) -> None:
        # cp_group: a torch.distributed ProcessGroup over which each call's sequence is split
        # (context parallelism, gla_cuda.distributed.chunk_gla): the chunked form at every length.
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("gate_low_rank_dim", gate_low_rank_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if use_short_conv and (isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 1):
            raise ValueError(f"conv_size must be a positive int, got {conv_size!r}")
        dims = {}
        for name, ratio in (("expand_k", expand_k), ("expand_v", expand_v)):
            exact = hidden_size * ratio
            dims[name] = round(exact)
            if not math.isclose(exact, dims[name]) or dims[name] < 1:
                raise ValueError(f"hidden_size * {name} must be a positive integer, got "
                                 f"{hidden_size} * {ratio} = {exact}")
            if dims[name] % num_heads:
                raise ValueError(f"hidden_size * {name} ({dims[name]}) must be divisible by "
                                 f"num_heads ({num_heads})")
        self.feature_map_fn = None if feature_map is None else _activation(feature_map, "feature_map")
        self.gate_fn = _activation(gate_fn, "gate_fn")

        self.mode, self.hidden_size, self.backend = mode, hidden_size, backend
        self.expand_k, self.expand_v = expand_k, expand_v
        self.key_dim, self.value_dim = dims["expand_k"], dims["expand_v"]
        if cp_group is not None and mode == "fused_recurrent":
            raise ValueError(f"cp_group needs the chunked form (mode 'chunk' or 'fused_chunk'), got mode={mode!r}")
        if cp_group is not None and use_short_conv:
            raise ValueError("cp_group does not support use_short_conv: the convolution would need the "
                             "previous rank's last conv_size - 1 tokens")
        self.cp_group = cp_group
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_kv_groups = num_heads // num_kv_heads
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.feature_map, self.gate_fn_name = feature_map, gate_fn
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        self.use_output_gate, self.layer_idx = use_output_gate, layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation="silu")
            self.k_conv1d = ShortConvolution(self.key_dim_per_group, conv_size, bias=conv_bias, activation="silu")
            self.v_conv1d = ShortConvolution(self.value_dim_per_group, conv_size, bias=conv_bias,
                                             activation="silu")
        # Low-rank gate: few parameters, as in the paper and fla.
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.key_dim_per_group, bias=True))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        norm = RMSNormGated(self.head_v_dim, norm_eps, bool(elementwise_affine))
        # fla's naming rule; whatever the name, a swish gate runs fused with the norm.
        self.fuse_norm_and_gate = gate_fn == "swish" and bool(fuse_norm) and use_output_gate
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = norm
        else:
            self.g_norm = norm
        self._swish_gate = use_output_gate and gate_fn in ("swish", "silu")

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, use_short_conv={self.use_short_conv}, "
                f"layer_idx={self.layer_idx}, kernels=gla_cuda")

    # ------------------------------------------------------------------ validation

    def _check_inputs(self, x, attention_mask, past_key_values, use_cache, cu_seqlens):
        """Every argument, before anything runs (a rejected call changes no cache).
        Returns the cache view (or None)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"hidden_states must be a Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, T, hidden_size] with hidden_size={self.hidden_size}, "
                             f"got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        w = self.q_proj.weight
        if x.device != w.device:
            raise ValueError(f"hidden_states is on {x.device} but the layer's parameters are on {w.device}")
        # Under torch.autocast the projections cast float16/bfloat16/float32 inputs and
        # parameters to the autocast dtype (float64 is never cast), so those mix freely there.
        autocast = torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, w.dtype)
        if not x.is_floating_point() or (x.dtype != w.dtype and not autocast):
            raise TypeError(f"hidden_states must have the layer's parameter dtype {w.dtype} (under "
                            f"torch.autocast: float16, bfloat16 or float32), got {x.dtype}")
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")

        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("pass either attention_mask or cu_seqlens, not both")
            if not isinstance(attention_mask, Tensor):
                raise TypeError(f"attention_mask must be a Tensor, got {type(attention_mask).__name__}")
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [B, T'] with B={B} and T' >= T={T} "
                                 f"(1 for tokens, 0 for padding), got shape {tuple(attention_mask.shape)}")
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise TypeError("attention_mask must be a bool or integer 0/1 padding mask (additive "
                                f"float masks are not supported), got {attention_mask.dtype}")
            if attention_mask.device != x.device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but hidden_states is on {x.device}")
        if cu_seqlens is not None:
            if isinstance(cu_seqlens, Tensor) and cu_seqlens.device != x.device:
                raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden_states is on {x.device}")
            _check_cu_seqlens(cu_seqlens, B, T)
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1

        if past_key_values is None:
            view = None
        elif isinstance(past_key_values, GLACache):
            view = _GLACacheView(past_key_values, self.layer_idx)
        elif is_fla_cache(past_key_values):
            view = _FLACacheView(past_key_values, self.layer_idx)
        else:
            raise TypeError("past_key_values must be a gla_cuda.GLACache, fla's cache "
                            f"(fla.models.utils.Cache) or None, got {type(past_key_values).__name__}")
        if (use_cache or view is not None) and (isinstance(self.layer_idx, bool)
                                                or not isinstance(self.layer_idx, int) or self.layer_idx < 0):
            raise ValueError("a cache needs the layer's layer_idx, a non-negative int "
                             f"(GatedLinearAttention(layer_idx=...)), got {self.layer_idx!r}")
        state = conv = None
        if view is not None:
            state, conv = view.read()
            state = self._check_state(state, view.v_first, N, x)
            conv = self._check_conv_state(conv, N, x)
        return view, state, conv, N

    def _check_state(self, state, v_first, N, x):
        if state is None:
            return None
        where = f"cache state of layer {self.layer_idx}"
        if not isinstance(state, Tensor):
            raise TypeError(f"{where} must be a Tensor, got {type(state).__name__}")
        if state.dtype != torch.float32:
            raise TypeError(f"{where} must be float32, got {state.dtype}")
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        want, layout = ((N, H, V, K), "[N, H, V, K]") if v_first else ((N, H, K, V), "[N, H, K, V]")
        if tuple(state.shape) != want:
            raise ValueError(f"{where} must have shape {layout} = {want}, got {tuple(state.shape)}")
        if state.device != x.device:
            raise ValueError(f"{where} is on {state.device} but hidden_states is on {x.device}")
        return state

    def _check_conv_state(self, conv, N, x):
        where = f"cache conv state of layer {self.layer_idx}"
        if not self.use_short_conv:
            if conv is not None:
                raise ValueError(f"{where} is set, but the layer has no short convolution "
                                 "(use_short_conv=False): the cache belongs to another model")
            return None
        if conv is None:
            return None
        if not isinstance(conv, (tuple, list)) or len(conv) != 3:
            raise TypeError(f"{where} must be a (q, k, v) tuple of tensors, got {type(conv).__name__}")
        W = self.conv_size
        for name, c, D in zip("qkv", conv, (self.key_dim, self.key_dim_per_group, self.value_dim_per_group)):
            if not isinstance(c, Tensor):
                raise TypeError(f"{where} ({name}) must be a Tensor, got {type(c).__name__}")
            if tuple(c.shape) != (N, D, W):
                raise ValueError(f"{where} ({name}) must have shape [N, D, W] = {(N, D, W)}, got {tuple(c.shape)}")
            if not c.is_floating_point():
                raise TypeError(f"{where} ({name}) must be floating point, got {c.dtype}")
            if c.device != x.device:
                raise ValueError(f"{where} ({name}) is on {c.device} but hidden_states is on {x.device}")
        return tuple(conv)

    # ------------------------------------------------------------------ forward

    def _kv_heads(self, x: Tensor, d: int) -> Tensor:
        """[B, T, num_kv_heads*d] -> [B, T, num_heads, d]: each kv head serves its group of query heads."""
        x = x.unflatten(-1, (self.num_kv_heads, d))
        return x.repeat_interleave(self.num_kv_groups, dim=2) if self.num_kv_groups > 1 else x

    def _in_place(self, state, use_cache, cu_seqlens, q) -> bool:
        """Whether a decoding step can update the cached state in place: without autograd and
        varlen, on the CPU or where the compiled CUDA kernels are built (elsewhere the pooled
        op would run the reference, which synchronises), with a backend that has the op."""
        return (state is not None and use_cache and cu_seqlens is None and not torch.is_grad_enabled()
                and state.is_contiguous()
                and dispatch.requested_backend(self.backend) in ("auto", "cuda", "reference")
                and (not q.is_cuda or cuda_backend.IMPORT_ERROR is None))

    def _short_conv(self, q, k, v, conv, use_cache, cu_seqlens, token_mask):
        """q, k, v through their convolutions. Returns them and the convolution states to
        store: the cached tensors themselves (to be overwritten in place) with their new
        values, or new tensors."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        T = q.shape[1]
        if conv is not None and use_cache and T == 1 and cu_seqlens is None and not torch.is_grad_enabled():
            # A decoding step: the new states are written into the cached ones at the end of the
            # call (their addresses never change; nothing is written before the call succeeds).
            rows = None if token_mask is None else token_mask[:, 0]
            out = [m.step(t, c, rows) for m, t, c in zip(convs, (q, k, v), conv)]
            return [o[0] for o in out], [(c, o[1]) for c, o in zip(conv, out)]
        out = [m(t, None if conv is None else c, use_cache, cu_seqlens, token_mask)
               for m, t, c in zip(convs, (q, k, v), conv or (None,) * 3)]
        return [o[0] for o in out], [(None, o[1]) for o in out]

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values=None, use_cache: Optional[bool] = False,
                cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, object]:
        """hidden_states: [B, T, hidden_size]. attention_mask: [B, T'] (T' >= T, its last T columns
        are used), bool or integer, 1 for tokens and 0 for padding: a padded position neither
        reads nor changes any state, its output is zeros. cu_seqlens: packed sequences (B = 1).
        past_key_values: a GLACache or fla's cache; with use_cache the final states go into it
        (into a new GLACache if None). Returns (output [B, T, hidden_size], past_key_values)."""
        use_cache = False if use_cache is None else use_cache  # fla's default is None
        view, state, conv, N = self._check_inputs(hidden_states, attention_mask, past_key_values,
                                                  use_cache, cu_seqlens)
        B, T, _ = hidden_states.shape
        token_mask = mask = None
        if attention_mask is not None:
            token_mask = attention_mask[:, -T:].bool()
            mask = token_mask[..., None].to(hidden_states.dtype)
        if use_cache and past_key_values is None:
            past_key_values = GLACache()
            view = _GLACacheView(past_key_values, self.layer_idx)

        x = hidden_states
        q, k, v, gk = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gk_proj(x)
        conv_out = None
        if self.use_short_conv:
            (q, k, v), conv_out = self._short_conv(q, k, v, conv, use_cache, cu_seqlens, token_mask)
        # The gate in float32 (float64 for float64 inputs): it compounds over T.
        g = F.logsigmoid(gk.to(torch.promote_types(gk.dtype, torch.float32))) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = g.clamp_min(self.clamp_min)
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))
        k, g = (self._kv_heads(t, self.head_k_dim) for t in (k, g))
        v = self._kv_heads(v, self.head_v_dim)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        if mask is not None:
            # A padded token neither writes (k = v = 0) nor decays (g = 0) the state, so each
            # row's state and outputs equal those of its unpadded sequence. Static shapes, no sync.
            m = mask[..., None]
            k, v, g = k * m, v * m, g * m

        v_first = view is not None and view.v_first
        if state is not None and v_first:
            state_kv = state.transpose(-1, -2)  # the kernels' [N, H, K, V]
        else:
            state_kv = state
        # Short inputs (decoding) run the recurrence, as fla does; training keeps the chosen mode.
        mode = "fused_recurrent" if T <= 64 and not self.training and self.cp_group is None else self.mode
        if mode == "fused_recurrent" and self._in_place(state, use_cache, cu_seqlens, q):
            # Inference from a cached state: advance it in place (no new state per step).
            rows = torch.arange(N, device=q.device)
            o = fused_recurrent_gla_pooled(q, k, v, g, state, rows, state_v_first=v_first,
                                           check_index=False, backend=self.backend)
            new_state = state
        else:
            fn = fused_recurrent_gla if mode == "fused_recurrent" else chunk_gla
            if self.cp_group is not None:
                fn = partial(distributed.chunk_gla, group=self.cp_group)
            o, new_state = fn(q, k, v, g, initial_state=state_kv, output_final_state=use_cache,
                              cu_seqlens=cu_seqlens, backend=self.backend)
            if use_cache and v_first:
                new_state = fla_options.v_first_out(new_state)
        if use_cache:
            new_conv = None
            if conv_out is not None:
                new_conv = []
                for old, new in conv_out:
                    if old is not None:
                        old.copy_(new)
                        new = old
                    new_conv.append(new)
                new_conv = tuple(new_conv)
            view.write(new_state, new_conv, T)

        if self._swish_gate:
            o = self._norm(o, self.g_proj(x).unflatten(-1, (-1, self.head_v_dim)))
        else:
            o = self._norm(o)
            if self.use_output_gate:
                o = o * self.gate_fn(self.g_proj(x)).unflatten(-1, (-1, self.head_v_dim))
        o = self.o_proj(o.flatten(-2))
        if mask is not None:
            o = o * mask  # padded positions give zeros
        return o, past_key_values

    def _norm(self, o: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        norm = self.g_norm_swish_gate if self.fuse_norm_and_gate else self.g_norm
        return norm(o, gate)
