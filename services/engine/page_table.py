"""The running requests' page tables, kept on the device and written incrementally.

Each request that runs on a paged backend gets a row of one int32 tensor
[rows, cols] (cols grow to the longest sequence seen). A step uploads only the
pages its requests gained since their last step, (flat index, page) pairs that
`apply` scatters, and `gather` reads the batch's rows; nothing is rebuilt from
Python lists per step.

Invariants: row 0 is all RESERVED_PAGE (the pad row of CUDA-graph buckets);
entries past a request's synced pages may hold a former owner's page ids (valid
ids, never read: kernels stop at seq_len);
`req.page_table_synced` pages of `req.pages` are on the device in
`req.page_table_row`. KVManager sets page_table_synced to 0 whenever it
replaces pages (admission, release, prefix-cache dedup); the engine frees the
row when the request leaves. Device writes are stream-ordered behind the
steps already launched, so a row freed or rewritten here never changes what an
in-flight step reads.
"""
from __future__ import annotations

import numpy as np
import torch

from .kv_pool import RESERVED_PAGE
from .request import Request

PAD_ROW = 0


class PageTable:
    def __init__(self, device: torch.device, rows: int = 64, cols: int = 64):
        self.device = device
        self.table = torch.full((rows, cols), RESERVED_PAGE, dtype=torch.int32, device=device)
        self._free = list(range(rows - 1, PAD_ROW, -1))

    @property
    def cols(self) -> int:
        return self.table.shape[1]

    def row_of(self, req: Request) -> int:
        if req.page_table_row < 0:
            if not self._free:
                self._grow(2 * self.table.shape[0], self.cols)
            req.page_table_row = self._free.pop()
            req.page_table_synced = 0
        return req.page_table_row

    def release(self, req: Request) -> None:
        if req.page_table_row > PAD_ROW:
            self._free.append(req.page_table_row)
        req.page_table_row, req.page_table_synced = -1, 0

    def updates(self, reqs, num_pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat index int64, page int32) of the pages each request (with a row: row_of)
        lacks on the device among its first num_pages[i]; marks them synced, since the step
        that uploads them runs before any later one reads the row."""
        if int(num_pages.max(initial=0)) > self.cols:
            self._grow(self.table.shape[0], max(2 * self.cols, int(num_pages.max())))
        cols = self.cols
        index: list[int] = []
        pages: list[int] = []
        for r, k in zip(reqs, num_pages.tolist()):
            s = r.page_table_synced
            if k > s:
                base = r.page_table_row * cols
                index += range(base + s, base + k)
                pages += r.pages[s:k]
                r.page_table_synced = k
        return np.asarray(index, np.int64), np.asarray(pages, np.int32)

    def apply(self, index: torch.Tensor, pages: torch.Tensor) -> None:
        if index.numel():
            self.table.view(-1)[index] = pages

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """[len(rows), width] page ids (RESERVED_PAGE past each sequence's pages)."""
        return self.table[rows.long(), :width]

    def _grow(self, rows: int, cols: int) -> None:
        old = self.table
        self.table = torch.full((rows, cols), RESERVED_PAGE, dtype=torch.int32, device=self.device)
        self.table[:old.shape[0], :old.shape[1]] = old
        self._free = list(range(rows - 1, old.shape[0] - 1, -1)) + self._free
