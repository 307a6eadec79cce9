"""Piecewise CUDA graphs: every step that is not a captured decode batch (prefill and
mixed prefill + decode steps, up to the step's token budget) replays the model's
token-wise layers from graphs and runs only attention eagerly.

Such a step cannot be captured whole: its attention depends on how the tokens split
into sequences, which changes every step. Everything else (embedding, norms, the
projections, rotary, the MLP) treats tokens as independent rows and depends only on
their count. So a forward of T tokens, T padded up to a bucket, is captured as
num_layers + 1 pieces, cut at each attention call:

    piece 0: embed, layer 0 up to its q, k, v           -> attention 0 (eager)
    piece i: layer i-1 after attention, layer i to q, k, v -> attention i (eager)
    piece L: the last layer after attention, the final norm

The cut is made by a stand-in for the attention backend (`_Cut`): where the model
calls attention, it copies q into a static buffer (inside the piece being captured;
k and v too, unless the rotary kernel stored them into the KV pool in the piece),
ends that capture and begins the next, and hands back a static output buffer,
which the next piece reads. At replay the real backend runs between the
pieces on the real rows, with the step's own metadata, and writes that buffer.

An eager step on a big GPU spends most of its time launching ~10 kernels a layer
from Python (Triton's launcher, torch's linear, argument checks), and the GPU waits:
with the pieces, a step launches num_layers + 1 graphs and only the attention
kernels. Padded rows (T up to the bucket) compute garbage that nothing reads: they
are not attended (attention runs on the real rows), write no KV (slot -1), and are
never sampled. A step whose token count is a bucket computes exactly what the eager
forward computes (the same matmul shapes); a padded one may round differently in
the last bit, as a padded decode graph may.

All pieces of all buckets share one memory pool with the decode graphs; they are
captured largest first, and only one forward replays at a time, in capture order.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from .forward_context import ForwardContext, forward_context

log = logging.getLogger("tandem.engine")


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, 256, then every multiple of 256 up to max_tokens (included)."""
    sizes = [t for t in (16, 32, 64, 128) if t < max_tokens] + list(range(256, max_tokens + 1, 256))
    if not sizes or sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


class _Cut:
    """Stands in for the attention backend while a forward runs piece by piece: copies
    q (and k, v unless the rotary kernel stored them, inside the piece) into the static
    buffers, calls on_cut(layer) (end one capture, begin the next; or, when not
    capturing, run the real attention), and returns the static output."""

    def __init__(self, owner: "PiecewiseGraphs", tokens: int, on_cut: Callable[[int], None]):
        self.owner, self.tokens, self.on_cut = owner, tokens, on_cut

    def fused_kv_store(self, layer: int, v: torch.Tensor, out_slots: torch.Tensor) -> tuple | None:
        return self.owner.backend.fused_kv_store(layer, v, out_slots)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_slots: torch.Tensor | None, meta: Any) -> torch.Tensor:
        o, n = self.owner, self.tokens
        o.q[:n].copy_(q)
        o.kv_stored = out_slots is None
        if not o.kv_stored:
            o.k[:n].copy_(k)
            o.v[:n].copy_(v)
        self.on_cut(layer)
        return o.o[:n]


class PiecewiseGraphs:
    # static inputs, in the runner's upload names
    INPUTS = ("input_ids", "positions", "out_slots")

    def __init__(self, model: torch.nn.Module, backend, max_tokens: int, device: torch.device,
                 use_graphs: bool = True):
        """use_graphs=False runs the same cut forward eagerly (tests on CPU)."""
        self.model, self.backend, self.device = model, backend, device
        self.buckets = token_buckets(max_tokens)
        self.use_graphs = use_graphs
        cfg, n = model.cfg, self.buckets[-1]
        act = dict(dtype=model.embed_tokens.weight.dtype, device=device)
        self.static = {"input_ids": torch.zeros(n, dtype=torch.int32, device=device),
                       "positions": torch.zeros(n, dtype=torch.int64, device=device),
                       "out_slots": torch.full((n,), -1, dtype=torch.int64, device=device)}
        self.q = torch.zeros(n, cfg.num_heads, cfg.head_dim, **act)
        self.k = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, **act)
        self.v = torch.zeros_like(self.k)
        self.o = torch.zeros(n, cfg.num_heads * cfg.head_dim, **act)
        self.kv_stored = False               # the pieces store K/V (the rotary kernel does)
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.layers: list[int] = []          # the layer of each cut, in order
        self.outputs: dict[int, torch.Tensor] = {}

    def bucket(self, tokens: int) -> int | None:
        """The bucket a step of this many tokens replays in, or None (run it eagerly)."""
        if tokens > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= tokens)

    def _forward(self, tokens: int, on_cut: Callable[[int], None]) -> torch.Tensor:
        s = self.static
        ctx = ForwardContext(s["out_slots"][:tokens], None, _Cut(self, tokens, on_cut))
        with forward_context(ctx):
            return self.model(s["input_ids"][:tokens], s["positions"][:tokens])

    @torch.inference_mode()
    def capture(self, pool) -> None:
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for i, n in enumerate(reversed(self.buckets)):
                for _ in range(2):                  # JIT / autotune outside the capture
                    self._forward(n, lambda layer: None)
                torch.cuda.synchronize(self.device)
                pieces, layers = [torch.cuda.CUDAGraph()], []

                def cut(layer: int) -> None:
                    pieces[-1].capture_end()
                    layers.append(layer)
                    pieces.append(torch.cuda.CUDAGraph())
                    pieces[-1].capture_begin(pool=pool)

                pieces[0].capture_begin(pool=pool)
                self.outputs[n] = self._forward(n, cut)
                pieces[-1].capture_end()
                if self.layers and layers != self.layers:
                    raise RuntimeError(f"piecewise capture of {n} tokens cut at {layers}, not {self.layers}")
                self.layers, self.pieces[n] = layers, pieces
                if i % 4 == 0:
                    log.info("CUDA graphs: captured the layers of %d-token steps (%d/%d)", n, i + 1, len(self.buckets))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("CUDA graphs: the layers of steps of %d..%d tokens, %d pieces each, in %.1f s", self.buckets[0],
                 self.buckets[-1], len(self.layers) + 1, time.perf_counter() - t0)

    def run(self, dev: dict[str, torch.Tensor], tokens: int, meta: Any) -> torch.Tensor:
        """Hidden states [tokens, hidden] of a step whose token inputs (`dev`, padded to its
        bucket by the runner) and attention metadata `meta` are on the device."""
        s = self.static
        n = dev["input_ids"].shape[0]
        for name in self.INPUTS:
            s[name][:n].copy_(dev[name])
        out_slots = s["out_slots"][:tokens]

        def attend(layer: int) -> None:
            slots = None if self.kv_stored else out_slots
            self.backend.forward(layer, self.q[:tokens], self.k[:tokens], self.v[:tokens], slots, meta,
                                 out=self.o[:tokens])

        if not self.use_graphs:
            return self._forward(n, attend)[:tokens]
        pieces = self.pieces[n]
        for piece, layer in zip(pieces, self.layers):
            piece.replay()
            attend(layer)
        pieces[-1].replay()
        return self.outputs[n][:tokens]
