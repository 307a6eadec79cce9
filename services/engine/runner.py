"""Turns a ScheduledBatch into tensors and runs the model.

The only place that knows both the scheduler's plain data and tensors.

Two ways in, by backend kind (attention/base.py):
- per-sequence backends (torch, cpu) get SeqSpecs with slot tensors;
- paged backends (triton, flashinfer) get a PagedBatch. Everything a step
  needs (ids, positions, slots, lengths, the page-table rows and the pages
  the requests gained) is built with numpy, packed into one pinned host
  buffer and copied to the device in one non-blocking copy; the page table
  itself lives on the device (page_table.py) and is only patched. The
  forward then never waits for the host. Decode batches replay a CUDA graph
  when one is captured (cuda_graph.py).

Input ids may be placeholders (< 0) of tokens sampled by the previous step and
not yet read back (overlap.py): `futures.resolve` swaps them on the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .attention.base import AttentionBackend, PagedBatch, SeqSpec
from .forward_context import ForwardContext, forward_context
from .kv_pool import RESERVED_PAGE, slot_tensor
from .overlap import FutureTokens
from .page_table import PAD_ROW, PageTable
from .request import Request
from .scheduler import Chunk, ScheduledBatch


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
        self.uploader = Uploader(device)
        self.page_table = PageTable(device)
        self.futures = FutureTokens(device)
        self.graphs = None          # cuda_graph.DecodeGraphs, set by the builder after capture
        self.piecewise = None       # piecewise_graph.PiecewiseGraphs (every other step), likewise

    def slots(self, pages: list[int], length: int) -> torch.Tensor:
        """KV slots of positions [0, length) of a sequence with these pages (CPU tensor)."""
        table = torch.tensor(pages[:-(-length // self.ps)], dtype=torch.int64)
        return slot_tensor(table, torch.arange(length), self.ps)

    def forget(self, req: Request) -> None:
        """The request left the engine: its page-table row is free."""
        self.page_table.release(req)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [S, V] (float32) of the chunks that sample, in batch order."""
        if self.backend.paged:
            return self._run_paged(batch.chunks)
        return self._run_seqs(batch)

    # -- paged backends: one upload, optional CUDA graph -----------------------------------------
    def _run_paged(self, chunks: tuple[Chunk, ...]) -> torch.Tensor:
        step = StepArrays.build(chunks, self.ps, self.page_table, self.backend.host_page_table)
        B, T = len(chunks), len(step.arrays["input_ids"])
        bucket = self.graphs.bucket(B) if self.graphs is not None and step.max_q_len == 1 else None
        pieces = self.piecewise.bucket(T) if bucket is None and self.piecewise is not None else None
        if bucket is not None:
            step = step.padded(bucket)
        elif pieces is not None:
            step = step.padded_tokens(pieces)
        dev = self.uploader.upload(step.arrays)
        self.page_table.apply(dev["pt_index"], dev["pt_pages"])
        dev["page_table"] = self.page_table.gather(dev["rows"], step.width)
        if step.has_futures:
            dev["input_ids"] = self.futures.resolve(dev["input_ids"])
        if bucket is not None:
            logits = self.graphs.replay(dev, B, step.paged_batch(dev))
            return logits if step.all_sample else logits[dev["sample_rows"]]
        meta = self.backend.build_paged(step.paged_batch(dev))
        if pieces is not None:
            hidden = self.piecewise.run(dev, T, meta)
        else:
            with forward_context(ForwardContext(dev["out_slots"], meta, self.backend)):
                hidden = self.model(dev["input_ids"], dev["positions"])
        if not step.all_sample:
            hidden = hidden[dev["sample_rows"]]
        return self.model.compute_logits(hidden)

    # -- per-sequence backends (torch, cpu) --------------------------------------------------------
    def _run_seqs(self, batch: ScheduledBatch) -> torch.Tensor:
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
        if min(ids) < 0:
            input_ids = self.futures.resolve(input_ids)
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


@dataclass
class StepArrays:
    """A step's inputs as host arrays (numpy), in the layout the device gets them.

    input_ids int32 [T] (< 0: a placeholder, see overlap.py), positions int64 [T],
    out_slots int64 [T] (-1: write nothing), rows int32 [B] (each sequence's row of
    the device page table), pt_index int64 / pt_pages int32 [K] (the page-table
    entries to write first), seq_lens / prefix_lens int32 [B], q_start int32 [B + 1],
    sample_rows int64 [S]. `host_table` (backends that plan on the host only) is the
    batch's page table int32 [B, width] (page 0 past a sequence's end).
    """
    arrays: dict[str, np.ndarray]
    max_q_len: int
    all_sample: bool            # every row samples (a decode batch): no gather of sample_rows
    num_decode: int = 0         # leading sequences with one new token
    ext_max_q_len: int = 0      # most new tokens among the others
    width: int = 1              # page-table columns the batch needs
    has_futures: bool = False   # some input id is a placeholder
    host_table: np.ndarray | None = None

    @classmethod
    def build(cls, chunks: tuple[Chunk, ...], ps: int, table: PageTable,
              host_table: bool = False) -> "StepArrays":
        B = len(chunks)
        # One pass over the chunks (hundreds a step): their fields, page-table rows, and
        # for the leading one-token sequences (decodes) their input id and KV slot.
        reqs, starts, ns, rows, samples, ids, slots = [], [], [], [], [], [], []
        nd = 0                                       # the leading one-token sequences
        for r, start, n, sample in chunks:
            reqs.append(r)
            starts.append(start)
            ns.append(n)
            samples.append(sample)
            row = r.page_table_row
            rows.append(row if row >= 0 else table.row_of(r))
            if n == 1 and nd == len(starts) - 1:
                p = len(r.prompt_ids)
                ids.append(r.output_ids[start - p] if start >= p else r.prompt_ids[start])
                slots.append(r.pages[start // ps] * ps + start % ps)
                nd += 1
        starts, ns = np.array(starts, np.int64), np.array(ns, np.int64)
        seq_lens = starts + ns
        npages = -(-seq_lens // ps)
        rows = np.array(rows, np.int32)
        pt_index, pt_pages = table.updates(reqs, npages)
        q_start = np.zeros(B + 1, np.int64)
        np.cumsum(ns, out=q_start[1:])
        T = int(q_start[-1])
        out_slots = np.array(slots, np.int64)
        if T == B:                                   # one token per sequence (decode)
            positions = starts
        else:
            positions = np.arange(T) - np.repeat(q_start[:-1] - starts, ns)
            ids += [t for c in chunks[nd:] for t in tokens_of(c.req, c.start, c.n)]
            out_slots = np.concatenate([out_slots] + [_chunk_slots(c, ps) for c in chunks[nd:]])
        input_ids = np.asarray(ids, np.int32)
        sample = np.array(samples, bool)
        arrays = {
            "input_ids": input_ids, "positions": positions.astype(np.int64), "out_slots": out_slots,
            "rows": rows, "pt_index": pt_index, "pt_pages": pt_pages, "seq_lens": seq_lens.astype(np.int32),
            "prefix_lens": starts.astype(np.int32), "q_start": q_start.astype(np.int32),
            "sample_rows": q_start[1:][sample] - 1, "ext_q_start": (q_start[nd:] - nd).astype(np.int32),
        }
        width = int(npages.max())
        return cls(arrays, int(ns.max()), bool(sample.all()) and T == B, nd, int(ns[nd:].max(initial=0)),
                   width, bool((input_ids < 0).any()), _host_table(reqs, npages, width) if host_table else None)

    def padded(self, bs: int) -> "StepArrays":
        """A decode step padded to bs sequences: the extra rows write nowhere (slot -1),
        attend to one position of the reserved page 0 (the page table's pad row) and are
        never sampled."""
        a = self.arrays
        pad = bs - len(a["seq_lens"])
        if pad == 0:
            return self
        fill = {"input_ids": 0, "positions": 0, "out_slots": -1, "seq_lens": 1, "prefix_lens": 0,
                "rows": PAD_ROW}
        out = {k: np.concatenate([a[k], np.full(pad, v, a[k].dtype)]) for k, v in fill.items()}
        for k in ("pt_index", "pt_pages", "sample_rows"):
            out[k] = a[k]
        out["q_start"] = np.arange(bs + 1, dtype=np.int32)
        out["ext_q_start"] = np.zeros(1, np.int32)
        host = self.host_table
        if host is not None:
            host = np.concatenate([host, np.full((pad, host.shape[1]), RESERVED_PAGE, np.int32)])
        return StepArrays(out, self.max_q_len, self.all_sample, bs, 0, self.width, self.has_futures, host)

    def padded_tokens(self, n: int) -> "StepArrays":
        """The token rows padded to n (piecewise graphs): the extra rows read token 0 at
        position 0, write nowhere (slot -1) and belong to no sequence."""
        a = self.arrays
        pad = n - len(a["input_ids"])
        if pad == 0:
            return self
        out = dict(a)
        for k, v in (("input_ids", 0), ("positions", 0), ("out_slots", -1)):
            out[k] = np.concatenate([a[k], np.full(pad, v, a[k].dtype)])
        return dataclasses.replace(self, arrays=out)

    def paged_batch(self, dev: dict[str, torch.Tensor]) -> PagedBatch:
        host = self.arrays if self.host_table is None else {**self.arrays, "page_table": self.host_table}
        return PagedBatch(dev["page_table"], dev["seq_lens"], dev["prefix_lens"], dev["q_start"],
                          self.max_q_len, host, self.num_decode, dev["ext_q_start"], self.ext_max_q_len)


def _chunk_slots(c: Chunk, ps: int) -> np.ndarray:
    pos = np.arange(c.start, c.start + c.n)
    first = c.start // ps
    pages = np.asarray(c.req.pages[first:(c.start + c.n - 1) // ps + 1], np.int64)
    return pages[pos // ps - first] * ps + pos % ps


def _host_table(reqs: list[Request], npages: np.ndarray, width: int) -> np.ndarray:
    table = np.zeros((len(reqs), width), np.int32)
    for i, (r, k) in enumerate(zip(reqs, npages.tolist())):
        table[i, :k] = r.pages[:k]
    return table


class Uploader:
    """Host arrays -> device tensors in one copy: packed into a pinned buffer (one of
    two, used in turn), copied non-blocking into one device buffer, viewed per name.

    A pinned buffer is rewritten only after the copy that last read it has finished
    (its event), so a step that ends without a host sync cannot race the copy.
    On CPU (tests) the same packing runs with plain buffers."""
    ALIGN = 16

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._host: list[torch.Tensor | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._dev: torch.Tensor | None = None
        self._turn = 0

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        offsets, total = [], 0
        for a in arrays.values():
            offsets.append(total)
            total += -(-a.nbytes // self.ALIGN) * self.ALIGN
        host = self._host_buffer(total)
        packed = host.numpy()
        for off, a in zip(offsets, arrays.values()):
            packed[off:off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        if self._dev is None or self._dev.numel() < total:
            self._dev = torch.empty(_grow(self._dev, total), dtype=torch.uint8, device=self.device)
        self._dev[:total].copy_(host[:total], non_blocking=True)
        if self.cuda:
            ev = self._events[self._turn] = self._events[self._turn] or torch.cuda.Event()
            ev.record()
        self._turn ^= 1
        return {name: self._dev[off:off + a.nbytes].view(_TORCH[a.dtype]).view(a.shape)
                for (name, a), off in zip(arrays.items(), offsets)}

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        i = self._turn
        if self._events[i] is not None:
            self._events[i].synchronize()        # the copy that read this buffer is done
        buf = self._host[i]
        if buf is None or buf.numel() < nbytes:
            buf = self._host[i] = torch.empty(_grow(buf, nbytes), dtype=torch.uint8, pin_memory=self.cuda)
        return buf


def _grow(buf: torch.Tensor | None, nbytes: int) -> int:
    return max(nbytes, 2 * (buf.numel() if buf is not None else 0), 1 << 16)


_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}
