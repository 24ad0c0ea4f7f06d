"""The accuracy gate: every candidate against the float64 reference before it is timed (one
that fails is not timed)."""
from __future__ import annotations

import torch

from gla_cuda.bench.cases import has_backward, qkvg
from gla_cuda.bench.report import first_line
from gla_cuda.testing import GATE_TOL, make_inputs, oracle, rel_err


def accuracy(fn, device, shape=(2, 300, 2, 64, 64), gate="normal", grads=True, seed=1,
             dtype=torch.bfloat16, g_dtype=None):
    """Relative errors of o, the final state and (optionally) every gradient vs float64 (g in
    g_dtype, default dtype)."""
    B, T, H, K, V = shape
    ins = make_inputs(B, T, H, K, V, dtype=dtype, device=device, g_dtype=g_dtype, gate=gate, h0=True, seed=seed)
    leaves = [x.detach().clone().requires_grad_(grads) for x in ins.values()]
    o, ht = fn(*leaves[:4], h0=leaves[4], final=True)
    do = torch.randn_like(o) if grads else None
    dht = torch.randn(ins["initial_state"].shape, device=device) if grads else None
    ref_o, ref_ht, *ref_g = oracle(ins, do=do, dht=dht, chunked=True)
    errs = {"o": rel_err(o, ref_o)}
    if ht is not None:
        errs["ht"] = rel_err(ht, ref_ht)
    if grads:
        # the inference forward too (no graph: no intermediates kept, a kernel of its own on sm_90)
        with torch.no_grad():
            o_i, ht_i = fn(*leaves[:4], h0=leaves[4], final=True)
        errs["o_nograd"] = rel_err(o_i, ref_o)
        if ht_i is not None:
            errs["ht_nograd"] = rel_err(ht_i, ref_ht)
        loss = (o.float() * do.float()).sum() + ((ht * dht).sum() if ht is not None else 0)
        loss.backward()
        for name, leaf, ref in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, ref_g[0]):
            if leaf.grad is not None:
                errs[name] = rel_err(leaf.grad, ref)
    return errs


def decode_accuracy(fn, device, B=8, H=4, K=128, V=128, dtype=torch.bfloat16, gate="normal", seed=2):
    """Relative errors of o and of the state after one step vs float64."""
    ins = make_inputs(B, 1, H, K, V, dtype=dtype, device=device, gate=gate, h0=True, seed=seed)
    with torch.no_grad():
        o, ht = fn(*(ins[n] for n in "qkvg"), ins["initial_state"].clone(),
                   torch.arange(B, device=device, dtype=torch.int32))
    if ht is None:
        raise RuntimeError("returned no state")
    ref_o, ref_ht = oracle(ins)
    return {"o": rel_err(o, ref_o), "ht": rel_err(ht, ref_ht)}


def gate(cands, device, dtype, dname, results, log, bar, over_budget, shape, isolated=None, grads=True):
    """Accuracy of every GLA candidate in dtype at shape; returns {name: fn} of those that pass
    (grads: with the gradients, for runs that time a backward). ``isolated``: name -> a call
    returning (errors, strong-gate errors) of a check already running in a child process
    (timing.start_child_check), collected after the others are checked."""
    usable, isolated = {}, isolated or {}
    if not cands:
        return usable
    tol = GATE_TOL[dtype]
    log(f"\naccuracy vs the float64 reference, {dname}, (B, T, H, K, V) = {shape}: relative error norms (o_nograd, "
        f"ht_nograd: the inference forward), then with gates of -20 per step (inference); above {tol:g} fails and is not timed")
    for name in [n for n in cands if n not in isolated] + list(isolated):
        fn, why = cands[name]
        bar.start(f"accuracy {dname} {name}")
        if fn is None:
            log(f"  {name:<11} skipped: {why}")
        elif name.startswith("sdpa"):
            try:  # softmax attention: a different function, nothing to compare; can it run at all?
                q = qkvg(1, 128, 1, shape[3], shape[3], device, dtype=dtype)[0]
                fn(q, q, q, q)
                usable[name] = fn
                log(f"  {name:<11} softmax attention (the baseline): no accuracy check")
            except Exception as e:
                log(f"  {name:<11} cannot run {dname}: {first_line(e)}")
        elif name in isolated or not over_budget(f"accuracy {name} {dname}"):
            has_bwd = grads and has_backward(name, device)
            try:
                if name in isolated:
                    errs, strong = isolated[name]()
                else:
                    errs = accuracy(fn, device, shape, grads=has_bwd, dtype=dtype)
                    strong = accuracy(fn, device, shape, gate="strong", grads=False, dtype=dtype)
            except Exception as e:
                log(f"  {name:<11} cannot run: {first_line(e)}")
            else:
                ok = max(errs.values()) < tol and max(strong.values()) < tol
                results["accuracy"].append({"backend": name, "dtype": dname, "op": "chunk", "shape": list(shape),
                                            "errors": errs, "strong_gates": strong, "ok": ok})
                log(f"  {name:<11} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                    + " | g=-20: " + " ".join(f"{k}={v:.1e}" for k, v in strong.items())
                    + ("" if ok else "  -> FAILS, not timed") + ("" if has_bwd else "  (forward only)"))
                if ok:
                    usable[name] = fn
        bar.advance()
    return usable


def decode_gate(dcands, check, device, dtype, dname, results, log, bar, over_budget):
    """decode_accuracy of every decode candidate at check = (B, H, K, V); returns {name: fn} of
    those that pass."""
    tol = GATE_TOL[dtype]
    usable = {}
    log(f"\ndecode: one step from a float32 state, {dname} q/k/v/g; accuracy vs float64 at (B, H, K, V) = "
        f"{check}, o and the state after the step")
    for name, fn in dcands.items():
        bar.start(f"decode accuracy {dname} {name}")
        if not over_budget(f"decode accuracy {name} {dname}"):
            try:
                errs = decode_accuracy(fn, device, *check, dtype=dtype)
            except Exception as e:
                log(f"  {name:<11} cannot run: {first_line(e)}")
            else:
                ok = max(errs.values()) < tol
                results["accuracy"].append({"backend": name, "dtype": dname, "op": "decode", "shape": list(check),
                                            "errors": errs, "ok": ok})
                log(f"  {name:<11} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                    + ("" if ok else "  -> FAILS, not timed"))
                if ok:
                    usable[name] = fn
        bar.advance()
    return usable
