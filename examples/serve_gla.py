"""Continuous batching over a state pool: a small generation server for a model of
GatedLinearAttention layers (random weights).

Requests of different lengths arrive over time and finish when they have generated their
tokens. Every layer keeps one float32 state pool [P, H, V, K] (V-first, as vLLM and SGLang
lay it out); a request owns one slot while it runs. Each step of the loop
  * admits the requests that arrived (a free slot each),
  * runs one prefill chunk (up to --prefill-chunk tokens) of every request still reading its
    prompt, packed into one varlen call per layer (gla_cuda.chunk_gla_pooled): a request's
    first chunk starts from zeros (has_initial_state = False), later ones from its slot,
  * runs one decode token for every generating request (gla_cuda.fused_recurrent_gla_verify_pooled
    with one token per row; rows without a request are padding, index -1), replayed from a
    CUDA graph on the GPU, with new tokens and slot indices each step.
Prefix reuse: a prompt's state after its first --prefix-len tokens is written by the
prefill as a checkpoint into a prefix-cache slot; a later request with the same first
tokens starts from that slot (read slot = cache, write slot = its own: copy-on-write) and
prefills only the rest.

At the end every request's greedy output is compared with generating it alone through the
layer's own forward and GLACache (no pool, no batching): they must be equal.

    python examples/serve_gla.py --device cpu --tiny        # < 30 s on a CPU
    python examples/serve_gla.py --device cuda              # decode steps from a CUDA graph
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import gla_cuda
from gla_cuda import GatedLinearAttention, GLACache

CHUNK = 64


class GLAModel(nn.Module):
    def __init__(self, vocab, d_model, layers, heads):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(layers))
        self.layers = nn.ModuleList(GatedLinearAttention(hidden_size=d_model, num_heads=heads, layer_idx=i)
                                    for i in range(layers))
        self.head = nn.Linear(d_model, vocab, bias=False)

    # -- the reference path: the layer's own forward with a GLACache, one request at a time
    def forward_alone(self, tokens, cache):
        x = self.embed(tokens)
        for norm, layer in zip(self.norms, self.layers):
            y, cache = layer(norm(x), past_key_values=cache, use_cache=True)
            x = x + y
        return self.head(x), cache

    # -- the serving path: the same layers, their attention through the pool ops
    def forward_pooled(self, tokens, attend):
        """tokens [B, T]; attend(layer_index, q, k, v, g) -> o [B, T, H, V]."""
        x = self.embed(tokens)
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            h = norm(x)
            q, k, v, g = project(layer, h)
            x = x + finish(layer, attend(i, q, k, v, g), h)
        return self.head(x)


def project(layer, x):
    """The layer's q, k, v and log-space gate, [B, T, H, *] (as GatedLinearAttention.forward)."""
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    g = F.logsigmoid(layer.gk_proj(x).float()) / layer.gate_logit_normalizer
    if layer.clamp_min is not None:
        g = g.clamp_min(layer.clamp_min)
    q = q.unflatten(-1, (layer.num_heads, layer.head_k_dim))
    k, g = (layer._kv_heads(t, layer.head_k_dim) for t in (k, g))
    return q, k, layer._kv_heads(v, layer.head_v_dim), g


def finish(layer, o, x):
    """The layer's output norm, gate and projection."""
    if layer.use_output_gate:
        o = layer.g_norm_swish_gate(o, layer.g_proj(x).unflatten(-1, (-1, layer.head_v_dim)))
    else:
        o = layer.g_norm(o)
    return layer.o_proj(o.flatten(-2))


@dataclass
class Request:
    rid: int
    prompt: list
    max_new: int
    arrival: int
    slot: int = -1
    done_prompt: int = 0            # prompt tokens already in the state
    read_slot: int = -1             # the slot the next prefill chunk starts from
    fresh: bool = True              # the next prefill chunk starts from zeros
    out: list = field(default_factory=list)


class Server:
    def __init__(self, model, num_slots, max_batch, prefill_chunk, prefix_len, device, use_graph):
        self.model, self.device = model, device
        layer = model.layers[0]
        self.H, self.K, self.V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
        self.pools = [torch.zeros(num_slots, self.H, self.V, self.K, device=device) for _ in model.layers]
        self.free = list(range(num_slots))
        self.prefix = {}            # tuple(prompt[:prefix_len]) -> slot holding the state after them
        self.prefix_len, self.prefill_chunk, self.max_batch = prefix_len, prefill_chunk, max_batch
        self.reused = 0
        self.graph = None
        # the decode step's static inputs (a CUDA graph replays them with new values)
        self.dec_tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.dec_slots = torch.full((max_batch, 1), -1, dtype=torch.long, device=device)
        self.use_graph = use_graph

    # ---- prefill: one chunk of every request still reading its prompt, packed
    def prefill(self, reqs):
        chunks, lens = [], []
        for r in reqs:
            n = min(self.prefill_chunk, len(r.prompt) - r.done_prompt)
            chunks.append(r.prompt[r.done_prompt:r.done_prompt + n])
            lens.append(n)
        dev = self.device
        tokens = torch.tensor([t for c in chunks for t in c], device=dev)[None]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)
        read = torch.tensor([r.read_slot for r in reqs], device=dev)
        write = torch.tensor([r.slot for r in reqs], device=dev)
        has = torch.tensor([not r.fresh for r in reqs], device=dev)
        # a checkpoint where a chunk crosses the prefix length of a prompt not yet cached
        every, marks, new_prefixes = CHUNK, torch.full((len(reqs), self.prefill_chunk // CHUNK), -1,
                                                       dtype=torch.long), []
        for i, r in enumerate(reqs):
            key = tuple(r.prompt[:self.prefix_len])
            end = r.done_prompt + lens[i]
            if len(r.prompt) > self.prefix_len and key not in self.prefix and r.done_prompt < self.prefix_len <= end \
                    and (self.prefix_len - r.done_prompt) % CHUNK == 0 and self.free:
                slot = self.free.pop()
                marks[i, (self.prefix_len - r.done_prompt) // CHUNK - 1] = slot
                new_prefixes.append((key, slot))
        marks = marks.to(dev)

        def attend(i, q, k, v, g):
            return gla_cuda.chunk_gla_pooled(q, k, v, g, self.pools[i], read, cu, has_initial_state=has,
                                             final_state_indices=write, checkpoint_every=every,
                                             checkpoint_indices=marks, state_v_first=True)
        logits = self.model.forward_pooled(tokens, attend)
        for key, slot in new_prefixes:
            self.prefix[key] = slot
        last = cu[1:] - 1
        nxt = logits[0, last].argmax(-1).tolist()
        for r, n, t in zip(reqs, lens, nxt):
            r.done_prompt += n
            r.read_slot, r.fresh = r.slot, False
            if r.done_prompt == len(r.prompt):
                r.out.append(t)

    # ---- decode: one token for every generating request, a fixed batch of max_batch rows
    def _decode_step(self):
        def attend(i, q, k, v, g):
            return gla_cuda.fused_recurrent_gla_verify_pooled(q, k, v, g, self.pools[i], self.dec_slots,
                                                              state_v_first=True)
        return self.model.forward_pooled(self.dec_tokens, attend)[:, -1].argmax(-1)

    def decode(self, reqs):
        self.dec_slots.fill_(-1)
        self.dec_tokens.zero_()
        rows = torch.tensor([r.slot for r in reqs], dtype=torch.long)
        self.dec_slots[:len(reqs), 0] = rows.to(self.device)
        self.dec_tokens[:len(reqs), 0] = torch.tensor([r.out[-1] for r in reqs]).to(self.device)
        if self.use_graph:
            if self.graph is None:
                # capture once (warmed up on a side stream first): slots -1 make the warm-up
                # and capture write nothing to the pools
                saved = self.dec_slots.clone()
                self.dec_slots.fill_(-1)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    self._decode_step()
                torch.cuda.current_stream().wait_stream(s)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.graph_out = self._decode_step()
                self.dec_slots.copy_(saved)
            self.graph.replay()
            nxt = self.graph_out
        else:
            nxt = self._decode_step()
        for r, t in zip(reqs, nxt[:len(reqs)].tolist()):
            r.out.append(t)

    def admit(self, r):
        r.slot = self.free.pop()
        key = tuple(r.prompt[:self.prefix_len])
        if len(r.prompt) > self.prefix_len and key in self.prefix:
            # prefix reuse: start from the cached state (copy-on-write into the own slot)
            r.read_slot, r.fresh, r.done_prompt = self.prefix[key], False, self.prefix_len
            self.reused += 1
        else:
            r.read_slot, r.fresh = r.slot, True

    def run(self, requests):
        waiting = sorted(requests, key=lambda r: r.arrival)
        running, finished, step = [], [], 0
        while waiting or running:
            while waiting and waiting[0].arrival <= step and len(running) < self.max_batch and len(self.free) > 1:
                r = waiting.pop(0)
                self.admit(r)
                running.append(r)
            pre = [r for r in running if r.done_prompt < len(r.prompt)]
            dec = [r for r in running if r.done_prompt == len(r.prompt) and 0 < len(r.out) < r.max_new]
            if pre:
                self.prefill(pre)
            if dec:
                self.decode(dec)
            for r in list(running):
                if len(r.out) >= r.max_new:
                    running.remove(r)
                    finished.append(r)
                    self.free.append(r.slot)
            step += 1
        return finished, step


@torch.no_grad()
def generate_alone(model, prompt, max_new, device):
    cache = GLACache()
    logits, cache = model.forward_alone(torch.tensor([prompt], device=device), cache)
    out = [logits[0, -1].argmax().item()]
    while len(out) < max_new:
        logits, cache = model.forward_alone(torch.tensor([[out[-1]]], device=device), cache)
        out.append(logits[0, -1].argmax().item())
    return out


def make_requests(n, vocab, prefix_len, gen, tiny):
    """Prompts of different lengths; every third one shares its first prefix_len tokens with
    the first request (prefix reuse), arriving after it has been prefilled."""
    reqs = []
    hi = 200 if tiny else 600
    base = torch.randint(vocab, (prefix_len + 40,), generator=gen).tolist()
    for i in range(n):
        length = int(torch.randint(20, hi, (1,), generator=gen))
        prompt = torch.randint(vocab, (length,), generator=gen).tolist()
        if i == 0:
            prompt = base
        elif i % 3 == 0:
            prompt = base[:prefix_len] + prompt[:max(1, length - prefix_len)]
        max_new = int(torch.randint(4, 12 if tiny else 48, (1,), generator=gen))
        reqs.append(Request(i, prompt, max_new, arrival=0 if i == 0 else 2 + 2 * i))
    return reqs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short requests (CPU, seconds)")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=128, help="a multiple of 64")
    p.add_argument("--prefix-len", type=int, default=128, help="a multiple of 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-graph", action="store_true", help="no CUDA graph for the decode step")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    vocab, d_model, layers, heads = (64, 64, 2, 2) if args.tiny else (512, 512, 4, 4)
    n = args.requests or (7 if args.tiny else 24)
    dev = torch.device(args.device)
    model = GLAModel(vocab, d_model, layers, heads).to(dev).eval()
    gen = torch.Generator().manual_seed(args.seed)
    requests = make_requests(n, vocab, args.prefix_len, gen, args.tiny)
    server = Server(model, num_slots=2 * args.max_batch + 4, max_batch=args.max_batch,
                    prefill_chunk=args.prefill_chunk, prefix_len=args.prefix_len, device=dev,
                    use_graph=dev.type == "cuda" and not args.no_graph)
    t0 = time.perf_counter()
    with torch.no_grad():
        finished, steps = server.run(requests)
    elapsed = time.perf_counter() - t0
    mismatches = []
    for r in sorted(finished, key=lambda r: r.rid):
        alone = generate_alone(model, r.prompt, r.max_new, dev)
        if alone != r.out:
            mismatches.append((r.rid, r.out, alone))
    tokens = sum(len(r.out) for r in finished)
    print(f"{len(finished)} requests, {steps} steps, {tokens} tokens generated in {elapsed:.2f} s; "
          f"prefix reused by {server.reused}; decode graph: {server.graph is not None}")
    assert not mismatches, f"served outputs differ from generating alone: {mismatches[:2]}"
    print("every request's greedy output equals generating it alone")
    return dict(finished=len(finished), steps=steps, reused=server.reused, graph=server.graph is not None)


if __name__ == "__main__":
    main()
