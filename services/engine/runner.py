"""Turns a ScheduledBatch into tensors and runs the model.

The only place that knows both the scheduler's plain data and tensors.
"""
from __future__ import annotations

import torch

from .attention.base import AttentionBackend, SeqSpec
from .forward_context import ForwardContext, forward_context
from .kv_pool import slot_tensor
from .request import Request
from .scheduler import ScheduledBatch


def tokens_of(req: Request, start: int, n: int) -> list[int]:
    """Token ids at positions [start, start + n) without concatenating the whole sequence."""
    p = len(req.prompt_ids)
    if start >= p:
        return req.output_ids[start - p:start - p + n]
    if start + n <= p:
        return req.prompt_ids[start:start + n]
    return req.prompt_ids[start:] + req.output_ids[:start + n - p]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, page_size: int,
                 device: torch.device):
        self.model = model
        self.backend = backend
        self.ps = page_size
        self.device = device

    def slots(self, pages: list[int], length: int) -> torch.Tensor:
        """KV slots of positions [0, length) of a sequence with these pages (CPU tensor)."""
        table = torch.tensor(pages[:-(-length // self.ps)], dtype=torch.int64)
        return slot_tensor(table, torch.arange(length), self.ps)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [S, V] (float32) of the chunks that sample, in batch order."""
        ids: list[int] = []
        positions: list[int] = []
        out_slots, specs, last_rows = [], [], []
        row = 0
        for c in batch.chunks:
            ids += tokens_of(c.req, c.start, c.n)
            positions += range(c.start, c.start + c.n)
            slots = self.slots(c.req.pages, c.start + c.n)
            out_slots.append(slots[c.start:])
            specs.append((c.start, c.n, slots))
            row += c.n
            if c.sample:
                last_rows.append(row - 1)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        ctx = ForwardContext(
            out_slots=torch.cat(out_slots).to(dev, non_blocking=True),
            attn_meta=self.backend.build([SeqSpec(s, n, sl.to(dev, non_blocking=True)) for s, n, sl in specs]),
            backend=self.backend,
        )
        with forward_context(ctx):
            hidden = self.model(input_ids, pos)
        if len(last_rows) == row:           # every token samples (pure decode): no gather
            return self.model.compute_logits(hidden)
        rows = torch.tensor(last_rows, dtype=torch.int64).to(dev, non_blocking=True)
        return self.model.compute_logits(hidden[rows])
