"""CUDA graphs of decode forwards, one per batch-size bucket.

A decode step (one new token per sequence) of B sequences is padded to the
smallest bucket >= B: the extra rows write their K/V nowhere (slot -1), see
one position of the reserved page 0 and are dropped from the logits. The
runner copies the step's inputs into the static buffers the graphs were
captured on, replays, and reads the hidden states of the first B rows; the
LM head runs after the graph on those B rows only. Batches larger than the
biggest bucket, and every non-decode batch, run eagerly.

All graphs share one memory pool and are captured largest first, so the
smaller ones reuse the larger one's activations.

Then each graph's replay is timed, and a bucket whose graph is slower than a
larger bucket's sends its batches to that one: cuBLAS picks a slow kernel for
some row counts (on an H100 the 8B's gate_up GEMM takes twice as long at 448
rows as at 464 or 512; benchmarks/micro/gemm_m_sweep.py), and padding past them
is cheaper.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from .attention.base import AttentionBackend, PagedBatch
from .forward_context import ForwardContext, forward_context

log = logging.getLogger("tandem.engine")


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to 256 and of 16 past it, up to max_bs
    (included): at most 1/16 of a big batch is padding."""
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, min(max_bs, 256) + 1, 8)) \
        + list(range(272, max_bs + 1, 16))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def route_buckets(times: dict[int, float], margin: float = 0.05) -> dict[int, int]:
    """The bucket each bucket's batches replay in, from the buckets' replay times: a larger
    one that is faster by more than `margin`, the fastest such, else itself."""
    route, best = {}, None
    for b in sorted(times, reverse=True):
        if best is not None and times[best] < times[b] * (1 - margin):
            route[b] = best
        else:
            route[b] = b
            if best is None or times[b] < times[best]:
                best = b
    return route


class DecodeGraphs:
    # static input buffers, in the runner's upload names
    INPUTS = ("input_ids", "positions", "out_slots", "seq_lens", "prefix_lens")

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, max_bs: int, max_pages: int,
                 device: torch.device, use_graphs: bool = True):
        """use_graphs=False replays eagerly on the same padded static buffers (tests on CPU)."""
        self.model, self.backend, self.device = model, backend, device
        self.buckets = graph_buckets(max_bs)
        self.use_graphs = use_graphs
        n = self.buckets[-1]
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        self.static = {
            "input_ids": torch.zeros(n, **i32), "positions": torch.zeros(n, **i64),
            "out_slots": torch.full((n,), -1, **i64), "seq_lens": torch.ones(n, **i32),
            "prefix_lens": torch.zeros(n, **i32), "q_start": torch.arange(n + 1, **i32),
            "page_table": torch.zeros(n, max_pages, **i32),
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.route = {b: b for b in self.buckets}       # set from measured replay times by capture()
        self.pool = None

    def bucket(self, batch_size: int) -> int | None:
        """The bucket a decode batch of this size replays in, or None (run it eagerly)."""
        if batch_size > self.buckets[-1]:
            return None
        return self.route[next(b for b in self.buckets if b >= batch_size)]

    def _batch(self, bs: int) -> PagedBatch:
        s = self.static
        return PagedBatch(s["page_table"][:bs], s["seq_lens"][:bs], s["prefix_lens"][:bs], s["q_start"][:bs + 1],
                          1, num_decode=bs)

    def _forward(self, bs: int, meta) -> torch.Tensor:
        s = self.static
        with forward_context(ForwardContext(s["out_slots"][:bs], meta, self.backend)):
            return self.model(s["input_ids"][:bs], s["positions"][:bs])

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """pool: a graph memory pool to share (the piecewise graphs'), else a new one."""
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for i, bs in enumerate(reversed(self.buckets)):
                meta = self.backend.graph_meta(self._batch(bs))
                for _ in range(2):                  # JIT / autotune outside the capture
                    self._forward(bs, meta)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    self.outputs[bs] = self._forward(bs, meta)
                self.graphs[bs] = g
                if i % 8 == 0 or bs == 1:
                    log.info("CUDA graphs: captured batch size %d (%d/%d)", bs, i + 1, len(self.buckets))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self._route()
        log.info("CUDA graphs: %d batch sizes (1..%d) in %.1f s, %.0f MiB", len(self.buckets), self.buckets[-1],
                 time.perf_counter() - t0, torch.cuda.memory_reserved(self.device) / 2**20)

    def _route(self) -> None:
        """Time each graph's replay (on the static buffers as captured: contexts of one
        token, so mostly the GEMMs; the best of 5) and route the buckets by it. The routed
        buckets' graphs stay (their memory is the shared pool's either way)."""
        times = {}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for bs, g in self.graphs.items():
            g.replay()
            best = float("inf")
            for _ in range(5):
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end))
            times[bs] = best
        self.route = route_buckets(times)
        for b, to in self.route.items():
            if to != b:
                log.info("CUDA graphs: batch size %d replays in bucket %d (%.2f ms against %.2f ms)",
                         b, to, times[to], times[b])

    def replay(self, dev: dict[str, torch.Tensor], batch_size: int, batch: PagedBatch) -> torch.Tensor:
        """Logits [batch_size, V] of a decode step whose inputs (`dev`, padded to its
        bucket by the runner) are on the device; `batch` is the same step as a PagedBatch
        (host arrays too) for the backend's prepare_replay."""
        s = self.static
        bs = dev["seq_lens"].shape[0]
        for name in self.INPUTS:
            s[name][:bs].copy_(dev[name])
        pt = dev["page_table"]
        s["page_table"][:bs, :pt.shape[1]].copy_(pt)
        if self.use_graphs:
            self.backend.prepare_replay(batch)
            self.graphs[bs].replay()
            hidden = self.outputs[bs]
        else:
            hidden = self._forward(bs, self.backend.build_paged(dataclasses.replace(self._batch(bs), host=batch.host)))
        return self.model.compute_logits(hidden[:batch_size])
