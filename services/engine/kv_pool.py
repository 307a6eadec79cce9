"""Paged KV memory: a page allocator and the per-layer K/V tensors it indexes.

A page holds the K and V of `page_size` consecutive positions of one sequence.
Slot ids address single positions: slot = page * page_size + offset, which
is the row of the flat per-layer cache tensors. Page 0 is reserved: it is
never handed out, so kernels and CUDA graphs can point padding or dummy slots
at it without clobbering anyone's KV.

Ownership (who frees a page): a page is either free (in the allocator), owned
by a request (alloc'ed by the scheduler for it), or owned by the radix cache
(adopted by RadixCache.insert). Exactly one of the three, always.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

RESERVED_PAGE = 0


class PageAllocator:
    """Free list of page ids 1..num_pages-1 (page 0 is reserved).

    alloc/free are O(n) in the pages moved, on per-step hot paths. Low page ids
    are handed out first on a fresh allocator (handy when reading dumps).
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1 (page 0 is reserved), got {num_pages}")
        self._num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, RESERVED_PAGE, -1))  # a stack
        self._used: set[int] = set()

    @property
    def num_pages(self) -> int:
        """All pages, the reserved page 0 included."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        self._used.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the free list, all or nothing: a page that is not in
        use (double free, reserved page, out of range) raises ValueError and
        frees none of them."""
        pages = list(pages)
        used = self._used
        for i, p in enumerate(pages):
            if p not in used:
                used.update(pages[:i])
                raise ValueError(f"free of page {p}, which is not allocated (double free?)")
            used.remove(p)
        self._free.extend(pages)

    def is_free(self, page: int) -> bool:
        return RESERVED_PAGE < page < self._num_pages and page not in self._used

    def is_used(self, page: int) -> bool:
        return page in self._used

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        both = free & self._used
        assert not both, f"pages both free and used: {sorted(both)[:10]}"
        every = set(range(1, self._num_pages))
        assert free | self._used == every, (
            f"pages lost or foreign: missing {sorted(every - free - self._used)[:10]}, "
            f"foreign {sorted((free | self._used) - every)[:10]}")


def slots_for(pages: Sequence[int], page_size: int, start: int, end: int) -> list[int]:
    """Slot ids of positions [start, end) of a sequence whose page table is `pages`."""
    if not 0 <= start <= end <= len(pages) * page_size:
        raise ValueError(f"positions [{start}, {end}) outside {len(pages)} pages of {page_size}")
    return [pages[p // page_size] * page_size + p % page_size for p in range(start, end)]


def slot_tensor(page_table: torch.Tensor, positions: torch.Tensor, page_size: int,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Vectorized slots_for. page_table is [max_pages] (one sequence) or
    [batch, max_pages]; with a 2-D table, either positions is [batch, T] or
    `rows` gives each position's row (a flat ragged batch)."""
    page_idx = torch.div(positions, page_size, rounding_mode="floor")
    offset = positions - page_idx * page_size
    if page_table.dim() == 1:
        pages = page_table[page_idx]
    elif rows is not None:
        pages = page_table[rows, page_idx]
    else:
        pages = torch.gather(page_table, 1, page_idx)
    return pages * page_size + offset


class KVPool:
    """The K/V cache tensors of every layer, shaped [num_pages * page_size,
    num_kv_heads, head_dim] (row = slot id), and the allocator of their pages."""

    def __init__(self, num_pages: int, page_size: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.allocator = PageAllocator(num_pages)
        shape = (num_pages * page_size, num_kv_heads, head_dim)
        # Empty, so a large pool costs nothing until pages are used (the OS maps memory
        # lazily); page 0 is zeroed: padding reads land there and must not bring NaNs
        # into masked math. Every other slot is written before it is read.
        self.k_cache = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_cache = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        for t in (*self.k_cache, *self.v_cache):
            t[:page_size].zero_()

    @staticmethod
    def pages_for_budget(budget_bytes: int, page_size: int, bytes_per_token: int) -> int:
        """How many pages fit in budget_bytes (page 0 included in the count)."""
        if page_size < 1 or bytes_per_token < 1:
            raise ValueError("page_size and bytes_per_token must be >= 1")
        return max(0, budget_bytes) // (page_size * bytes_per_token)

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([n, num_kv_heads, head_dim]) of one layer at `slots` ([n])."""
        self.k_cache[layer][slots] = k
        self.v_cache[layer][slots] = v

    # -- moving KV between workers ---------------------------------------------------------
    # The wire layout of a run of positions is [n, num_layers, 2 (k, v), num_kv_heads,
    # head_dim]: a token range is contiguous, so it can be cut into chunks anywhere.
    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The KV at `slots` ([n]) of every layer, in the wire layout (a copy)."""
        slots = slots.to(self.device)
        per_layer = [torch.stack((k[slots], v[slots]), dim=1) for k, v in zip(self.k_cache, self.v_cache)]
        return torch.stack(per_layer, dim=1)

    def scatter(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write `kv` (wire layout, [n, ...]) at `slots` ([n]) of every layer."""
        expected = (len(slots), self.num_layers, 2, self.num_kv_heads, self.head_dim)
        if tuple(kv.shape) != expected:
            raise ValueError(f"KV of shape {tuple(kv.shape)} does not fit this pool: expected {expected}")
        slots = slots.to(self.device)
        kv = kv.to(self.device, self.dtype)
        for layer in range(self.num_layers):
            self.k_cache[layer][slots] = kv[:, layer, 0]
            self.v_cache[layer][slots] = kv[:, layer, 1]
