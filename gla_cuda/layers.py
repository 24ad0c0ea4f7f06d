"""GatedLinearAttention: the GLA token-mixing layer (as in fla's ``fla.layers.GatedLinearAttention``)
and GLACache, the per-layer recurrent states kept between generation steps.

Submodule names follow fla (q_proj, k_proj, v_proj, gk_proj, g_proj, o_proj, g_norm_swish_gate /
g_norm), so an fla GLA layer's state_dict loads as is.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gla_cuda import dispatch, distributed
from gla_cuda.api import chunk_gla, fused_recurrent_gla, fused_recurrent_gla_pooled
from gla_cuda.backends import cuda as cuda_backend

_MODES = ("chunk", "fused_recurrent")


class GLACache:
    """Recurrent states for generation: per layer_idx one float32 [N, H, K, V] tensor."""

    def __init__(self) -> None:
        self.states: List[Optional[Tensor]] = []
        self.seen_tokens: List[int] = []

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> Optional[Tensor]:
        return self.states[layer_idx] if layer_idx < len(self.states) else None

    def update(self, state: Tensor, layer_idx: int, offset: int = 0) -> None:
        """Stores layer_idx's state after ``offset`` more tokens. Decoding steps advance a stored
        state in place; its address never changes, so torch.compile's CUDA graphs (mode=
        "reduce-overhead") can replay a decoding step that updates it."""
        while len(self.states) <= layer_idx:
            self.states.append(None)
            self.seen_tokens.append(0)
        if isinstance(state, Tensor) and state.is_cuda and state is not self.states[layer_idx] \
                and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(state)
        self.states[layer_idx] = state
        self.seen_tokens[layer_idx] += offset

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens[layer_idx] if layer_idx < len(self.seen_tokens) else 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the states of the selected batch rows."""
        self.states = [None if s is None else s.index_select(0, beam_idx.to(s.device)) for s in self.states]


class RMSNormGated(nn.Module):
    """y = RMSNorm(x) * weight * act(gate) over the last dim, computed in float32
    (fla's FusedRMSNormGated; act is swish, or no gate at all when gate is None)."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        # One fused Triton kernel on CUDA (forward and backward), the PyTorch math elsewhere.
        return torch.ops.gla.rms_norm_gated(x, gate, self.weight, self.eps, "auto")


class GatedLinearAttention(nn.Module):
    """Gated linear attention layer (Yang et al., 2024), hidden_states [B, T, hidden_size] in and out.

    q, k, v are projections of x; the forget gate is a low-rank projection
    g = logsigmoid(W2 W1 x) / gate_logit_normalizer (optionally clamped below at clamp_min);
    num_kv_heads < num_heads shares each k/v/gate head among num_heads // num_kv_heads query heads.
    The attention output is normalised per head by RMSNorm and, with use_output_gate, multiplied
    by swish(g_proj(x)).
    """

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 0.5,
                 expand_v: float = 1.0, num_heads: int = 4, num_kv_heads: Optional[int] = None,
                 use_output_gate: bool = True, elementwise_affine: bool = True, norm_eps: float = 1e-5,
                 gate_logit_normalizer: float = 16, gate_low_rank_dim: int = 16,
                 clamp_min: Optional[float] = None, layer_idx: Optional[int] = None,
                 backend: Optional[str] = None, cp_group=None) -> None:
        # cp_group: a torch.distributed ProcessGroup over which each call's sequence is split
        # (context parallelism, gla_cuda.distributed.chunk_gla): chunk mode at every length.
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        for name, dim in (("key_dim = hidden_size * expand_k", self.key_dim),
                          ("value_dim = hidden_size * expand_v", self.value_dim)):
            if dim % num_heads:
                raise ValueError(f"{name} ({dim}) must be divisible by num_heads ({num_heads})")

        self.mode, self.hidden_size, self.backend = mode, hidden_size, backend
        if cp_group is not None and mode != "chunk":
            raise ValueError(f"cp_group needs mode='chunk', got mode={mode!r}")
        self.cp_group = cp_group
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_kv_groups = num_heads // num_kv_heads
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        self.use_output_gate, self.layer_idx = use_output_gate, layer_idx

        kv_k, kv_v = num_kv_heads * self.head_k_dim, num_kv_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_k, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_v, bias=False)
        # Low-rank gate: few parameters, as in the paper and fla.
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, kv_k, bias=True))
        norm = RMSNormGated(self.head_v_dim, norm_eps, elementwise_affine)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.g_norm_swish_gate = norm
        else:
            self.g_norm = norm
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def _kv_heads(self, x: Tensor, d: int) -> Tensor:
        """[B, T, num_kv_heads*d] -> [B, T, num_heads, d]: each kv head serves its group of query heads."""
        x = x.unflatten(-1, (self.num_kv_heads, d))
        return x.repeat_interleave(self.num_kv_groups, dim=2) if self.num_kv_groups > 1 else x

    def _cached_state(self, cache: GLACache, x: Tensor, N: int) -> Optional[Tensor]:
        state = cache[self.layer_idx]
        if state is None:
            return None
        where = f"cache state of layer {self.layer_idx}"
        if not isinstance(state, Tensor):
            raise TypeError(f"{where} must be a Tensor, got {type(state).__name__}")
        if state.dtype != torch.float32:
            raise TypeError(f"{where} must be float32, got {state.dtype}")
        want = (N, self.num_heads, self.head_k_dim, self.head_v_dim)
        if tuple(state.shape) != want:
            raise ValueError(f"{where} must have shape [N, H, K, V] = {want}, got {tuple(state.shape)}")
        if state.device != x.device:
            raise ValueError(f"{where} is on {state.device} but hidden_states is on {x.device}")
        return state

    def _in_place(self, state, use_cache, cu_seqlens, q) -> bool:
        """Whether a decoding step can update the cached state in place: without autograd and
        varlen, on the CPU or where the compiled CUDA kernels are built (elsewhere the pooled
        op would run the reference, which synchronises), with a backend that has the op."""
        return (state is not None and use_cache and cu_seqlens is None and not torch.is_grad_enabled()
                and dispatch.requested_backend(self.backend) in ("auto", "cuda", "reference")
                and (not q.is_cuda or cuda_backend.IMPORT_ERROR is None))

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[GLACache] = None, use_cache: bool = False,
                cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Optional[GLACache]]:
        """hidden_states: [B, T, hidden_size]. attention_mask: [B, T'] (T' >= T, its last T columns
        are used) with 1 for tokens and 0 for left padding. cu_seqlens: packed sequences (B = 1).
        With use_cache the final states go into past_key_values (a new GLACache if None).
        Returns (output [B, T, hidden_size], past_key_values)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, T, hidden_size], got {tuple(hidden_states.shape)}")
        B, T, _ = hidden_states.shape
        mask = None
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("pass either attention_mask or cu_seqlens, not both")
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [B, T'] with B={B} and T' >= T={T}, "
                                 f"got shape {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -T:, None].to(hidden_states.dtype)
        if (use_cache or past_key_values is not None) and self.layer_idx is None:
            raise ValueError("a cache needs the layer's layer_idx (GatedLinearAttention(layer_idx=...))")
        if use_cache and past_key_values is None:
            past_key_values = GLACache()
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        state = None if past_key_values is None else self._cached_state(past_key_values, hidden_states, N)

        x = hidden_states
        q, k, v, gk = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gk_proj(x)
        g = F.logsigmoid(gk.float()) / self.gate_logit_normalizer  # gate in float32: it compounds over T
        if self.clamp_min is not None:
            g = g.clamp_min(self.clamp_min)
        if mask is not None:
            # A padded token neither writes (k = v = 0) nor decays (g = 0) the state, so each
            # row's state and outputs equal those of its unpadded sequence. Static shapes, no sync.
            k, v, g = k * mask, v * mask, g * mask
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))
        k, g = (self._kv_heads(t, self.head_k_dim) for t in (k, g))
        v = self._kv_heads(v, self.head_v_dim)

        # Short inputs (decoding) run the recurrence, as fla does; training keeps the chosen mode.
        mode = "fused_recurrent" if T <= 64 and not self.training and self.cp_group is None else self.mode
        if mode == "fused_recurrent" and self._in_place(state, use_cache, cu_seqlens, q):
            # Inference from a cached state: advance it in place (no new state per step).
            rows = torch.arange(N, device=q.device)
            o = fused_recurrent_gla_pooled(q, k, v, g, state, rows, check_index=False, backend=self.backend)
        else:
            fn = chunk_gla if mode == "chunk" else fused_recurrent_gla
            if self.cp_group is not None:
                fn = partial(distributed.chunk_gla, group=self.cp_group)
            o, state = fn(q, k, v, g, initial_state=state, output_final_state=use_cache,
                          cu_seqlens=cu_seqlens, backend=self.backend)
        if use_cache:
            past_key_values.update(state, self.layer_idx, T)

        if self.use_output_gate:
            o = self.g_norm_swish_gate(o, self.g_proj(x).unflatten(-1, (-1, self.head_v_dim)))
        else:
            o = self.g_norm(o)
        o = self.o_proj(o.flatten(-2))
        if mask is not None:
            o = o * mask  # padded positions give zeros
        return o, past_key_values
