"""Backends: each module here implements the same four functions.

    chunk_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
        -> (o, final_state or None)
    chunk_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht)
        -> (dq, dk, dv, dg, dh0 or None)
    recurrent_fwd / recurrent_bwd: the same signatures, for the recurrent ops.
    recurrent_pool_fwd_(q, k, v, g, scale, state_pool, state_index, state_v_first) -> o
        (serving: updates state_pool in place; optional: a backend without it says so
        in unsupported_reason)
    chunk_pool_fwd_(q, k, v, g, scale, state_pool, state_indices, has_initial_state,
                    final_state_indices, cu_seqlens, checkpoint_every, checkpoint_indices,
                    state_v_first, o) -> None
        serving prefill (gla_cuda/serving.py): packed sequences from and to pool slots,
        state checkpoints every checkpoint_every tokens; writes o and the pool in place
    recurrent_verify_pool_fwd_(q, k, v, g, scale, state_pool, state_indices,
                               num_accepted_tokens, cu_seqlens, state_v_first, o) -> None
        serving speculative-decoding verify: the state after every token to its own slot
    recurrent_gv_fwd(q, k, v, gk, gv, scale, initial_state, output_final_state, reverse,
                     cu_seqlens) -> (o, final_state or None)
        the recurrence with a value gate (fla's gv; gla_cuda/fla_options.py); differentiable
        by autograd; only the reference has it
    unsupported_reason(op, q, k, v, g, initial_state, cu_seqlens) -> None or a short reason
        (op is one of OPS; gla_cuda.dispatch asks it before choosing the backend)
    auto_skip_reason(...): optional, same arguments: inputs the backend runs but leaves to
        the next backend under "auto" because that one is faster there (None: no opinion)

What the caller (gla_cuda.ops) guarantees:
  * q, k, g: [B, T, H, K]; v: [B, T, H, V]; all contiguous and on one device.
  * q, k, v share one dtype (float16, bfloat16 or float32; float64 only for the
    reference); g is float32 or that dtype. scale is a finite Python float.
  * initial_state: None or float32 contiguous [N, H, K, V]; dht likewise.
  * cu_seqlens: None, or a contiguous int32/int64 [N + 1] tensor on q's device,
    starting at 0, non-decreasing, ending at T, with B == 1. N = B otherwise. The values
    are checked on the host where that costs no synchronisation (CPU offsets, or the
    caller's host copy cu_seqlens_cpu); GPU offsets without one are the caller's word.
  * do: [B, T, H, V] in v's dtype, contiguous.
  * recurrent_pool_fwd_: no cu_seqlens; state_pool float32 contiguous [P, H, K, V]
    ([P, H, V, K] with state_v_first), passed as initial_state to unsupported_reason;
    state_index int32/int64 [B] on the same device, values unchecked (outside [0, P): skip).
  * chunk_pool_fwd_ / recurrent_verify_pool_fwd_: the pool likewise (passed as
    initial_state to unsupported_reason); every index tensor int32/int64 on q's device,
    values unchecked (gla_cuda/serving.py documents what each value means); o is
    preallocated in v's shape and dtype. chunk_pool_fwd_ always has cu_seqlens (B == 1).

  * the inputs are not empty: q and v both have elements (gla_cuda.dispatch writes the
    results of empty inputs itself, without a backend: see dispatch.empty_reason).

Gates (one rule for every backend): g is the log of a forget gate, g <= 0. Any g <=
GATE_MIN (-inf included: a hard reset, the state is forgotten) acts as GATE_MIN, whose
exp is 0 in float32 and in every product a backend forms from it (exp(-128) ~ 3e-56,
far below float32's smallest subnormal 1.4e-45): the result is the exact one, finite,
and dg is 0 at those entries (exp(g) is a factor of every term of dg_t). A backend that
sums gates (the chunked form's cumulative b) clamps at the gate load, max(g, GATE_MIN)
(a NaN stays NaN), so that no -inf enters a sum and no -inf - (-inf) is formed; one that
only multiplies by exp(g) (the recurrence) may use exp(-inf) = 0 as it is. Clamping in a
separate pass over g would cost a memory pass: do it in the kernel's load. The float32
cumulative sum of clamped gates loses ~ulp(|b|) of the decays between resets in one chunk
(|b| <= 64 * 128), still well inside the float32 tolerances.

Containment: every sequence (packed with cu_seqlens, or a batch row, or a pooled row)
is computed from its own tokens and state only: a NaN or inf in one leaves every other
sequence's outputs, states and gradients bitwise as they were without it.

What a backend returns: o in v's dtype; final_state and dh0 float32 [N, H, K, V]
(final_state only when output_final_state, dh0 only when initial_state is given);
dq, dk, dv, dg in the dtypes and shapes of q, k, v, g. A backend running on the GPU
never synchronises with the host (no .item() / .tolist() on device tensors).
"""

GATE_MIN = -128.0


def compute_dtype(dtype):
    """The dtype of states (initial, final, dh0) and of accumulation for inputs of ``dtype``:
    float32, except float64 inputs (the reference only, for gradcheck), which keep float64."""
    import torch  # this module stays importable without torch for the build
    return torch.float64 if dtype == torch.float64 else torch.float32

OPS = ("chunk_fwd", "chunk_bwd", "recurrent_fwd", "recurrent_bwd", "recurrent_pool_fwd_",
       "chunk_pool_fwd_", "recurrent_verify_pool_fwd_", "recurrent_gv_fwd")
