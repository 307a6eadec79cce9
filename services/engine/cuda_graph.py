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
"""
from __future__ import annotations

import logging
import time

import torch

from .attention.base import AttentionBackend
from .nano_batch import decode_forward, split_rows

log = logging.getLogger("tandem.engine")


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to 256 and of 16 past it, up to max_bs
    (included): at most 1/16 of a big batch is padding."""
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, min(max_bs, 256) + 1, 8)) \
        + list(range(272, max_bs + 1, 16))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    # static input buffers, in the runner's upload names
    INPUTS = ("input_ids", "positions", "out_slots", "seq_lens", "prefix_lens")

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, max_bs: int, max_pages: int,
                 device: torch.device, use_graphs: bool = True, nano_batch_min_bs: int = 0):
        """use_graphs=False replays eagerly on the same padded static buffers (tests on CPU).
        Buckets of at least nano_batch_min_bs sequences run as two halves on two streams
        (nano_batch.py; 0: never)."""
        self.model, self.backend, self.device = model, backend, device
        self.buckets = graph_buckets(max_bs)
        self.use_graphs = use_graphs
        self.nano_batch_min_bs = nano_batch_min_bs
        self.side: torch.cuda.Stream | None = None      # the second half's stream, while capturing
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
        self.pool = None

    def bucket(self, batch_size: int) -> int | None:
        """The bucket a decode batch of this size replays in, or None (run it eagerly)."""
        if batch_size > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= batch_size)

    def _forward(self, bs: int) -> torch.Tensor:
        bufs = {name: t[:bs] for name, t in self.static.items()}
        bufs["q_start"] = self.static["q_start"][:bs + 1]
        return decode_forward(self.model, self.backend, bufs, split_rows(bs, self.nano_batch_min_bs), self.side)

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
                for _ in range(2):                  # JIT / autotune outside the capture
                    self._forward(bs)
                g = torch.cuda.CUDAGraph()
                if len(split_rows(bs, self.nano_batch_min_bs)) > 1:
                    self.side = torch.cuda.Stream(self.device)
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    self.outputs[bs] = self._forward(bs)
                self.side = None
                self.graphs[bs] = g
                if i % 8 == 0 or bs == 1:
                    log.info("CUDA graphs: captured batch size %d (%d/%d)", bs, i + 1, len(self.buckets))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("CUDA graphs: %d batch sizes (1..%d) in %.1f s, %.0f MiB", len(self.buckets), self.buckets[-1],
                 time.perf_counter() - t0, torch.cuda.memory_reserved(self.device) / 2**20)

    def replay(self, dev: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Logits [batch_size, V] of a decode step whose inputs (`dev`, padded to its
        bucket by the runner) are on the device."""
        s = self.static
        bs = dev["seq_lens"].shape[0]
        for name in self.INPUTS:
            s[name][:bs].copy_(dev[name])
        pt = dev["page_table"]
        s["page_table"][:bs, :pt.shape[1]].copy_(pt)
        if self.use_graphs:
            self.graphs[bs].replay()
            hidden = self.outputs[bs]
        else:
            hidden = self._forward(bs)
        return self.model.compute_logits(hidden[:batch_size])
