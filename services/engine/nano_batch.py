"""Big decode batches as two half-batches on two CUDA streams (NanoFlow's nano-batches).

A decode step of a big batch is memory-bound attention (each sequence's KV read
once) then compute-bound GEMMs, layer after layer, each kernel filling the GPU.
Split the batch in two halves whose forwards are independent, put the second on
a side stream that starts once the first reaches its first attention, and one
half's attention runs beside the other's GEMMs:

    main:  qkv0 | attn0 | o, mlp, qkv1 | attn1 | ...        (half A)
    side:         qkv0  | attn0        | o, mlp, qkv1 | ...  (half B)

Each half reads the weights once more and its GEMMs are half as tall, which costs
~3% of one 8B layer at batch 448 on an H200; the overlap wins back ~10%, for a net
7% there (5% on an H100; benchmarks/micro/gpu_overlap.py). At batch 256 the split
loses, hence `min_bs`; and in the engine on an H100 the 1B model's throughput run
lost 9% with it (benchmarks/results/gpu_h100.md), so it is off by default
(EngineConfig.decode_nano_batch_min_bs = 0) until the 8B on an H200 says otherwise.

The split depends only on the batch size, and eager forwards of a decode batch
split the same way (one stream, one half after the other), so a captured graph and
an eager forward compute the same GEMM shapes and give the same floats.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .attention.base import AttentionBackend, PagedBatch
from .forward_context import ForwardContext, forward_context


def split_rows(bs: int, min_bs: int) -> list[tuple[int, int]]:
    """Row ranges of the halves of a decode batch of bs sequences: two when bs >= min_bs
    (min_bs 0: never), the first rounded up to a multiple of 8 rows."""
    if not min_bs or bs < min_bs:
        return [(0, bs)]
    h = min(bs - 1, -(-bs // 16) * 8)
    return [(0, h), (h, bs)]


class _SignalFirstAttention:
    """Stands in for the first half's backend: records `event` when its layer 0 calls
    attention (after that layer's q/k/v projection), where the second half may start."""

    def __init__(self, backend: AttentionBackend, event: torch.cuda.Event):
        self.backend, self.event = backend, event

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward(self, layer: int, *args, **kwargs):
        if layer == 0:
            self.event.record()
        return self.backend.forward(layer, *args, **kwargs)


def decode_forward(model: torch.nn.Module, backend: AttentionBackend, bufs: dict[str, torch.Tensor],
                   parts: list[tuple[int, int]], side: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Hidden states [bs, hidden] of a decode batch whose inputs are `bufs` (input_ids,
    positions, out_slots, seq_lens, prefix_lens, q_start (0, 1, ..., bs), page_table),
    forwarded in the row ranges `parts`; the second on stream `side` when one is given
    (CUDA graph capture), else after the first."""
    outs = []
    main = torch.cuda.current_stream() if side is not None else None
    started = torch.cuda.Event() if side is not None and len(parts) > 1 else None
    for i, (lo, hi) in enumerate(parts):
        n = hi - lo
        pb = PagedBatch(bufs["page_table"][lo:hi], bufs["seq_lens"][lo:hi], bufs["prefix_lens"][lo:hi],
                        bufs["q_start"][:n + 1], 1, num_decode=n)
        be = _SignalFirstAttention(backend, started) if started is not None and i == 0 else backend
        stream = nullcontext()
        if started is not None and i == 1:
            side.wait_event(started)
            stream = torch.cuda.stream(side)
        with stream, forward_context(ForwardContext(bufs["out_slots"][lo:hi], backend.build_paged(pb), be)):
            outs.append(model(bufs["input_ids"][lo:hi], bufs["positions"][lo:hi]))
    if started is not None:
        main.wait_stream(side)
    return outs[0] if len(outs) == 1 else torch.cat(outs)
