"""The gateway's global prefix index: which worker has cached which KV pages.

Built from the workers' KV events (DESIGN.md section 3). Page hashes are
chained (services.common.page_hash): a page's hash covers its parent's hash and
its own tokens, so one hash names a whole prefix and the tree needs no explicit
parent links. The index is therefore a flat map

    page hash -> {worker: deadline}

where the deadline is math.inf for a confirmed page (a `stored` event) and
insert time + speculative_ttl for a page the gateway inserted speculatively
when it routed a request there. A second map, worker -> its hashes, makes
clear(worker) O(pages of that worker).

A worker's radix cache holds a page only with all its ancestors, so the pages
a worker holds of a prompt are a leading run of the prompt's hashes: match()
walks the prompt's chain from the root and counts, per worker, how far it gets.

Speculative entries expire lazily: every public method first purges, in
insertion order, the entries whose deadline has passed (one deque, deadlines
never decrease under a monotonic clock), so an expired entry never counts and
memory stays bounded by the speculative inserts of the last speculative_ttl
seconds. Not thread-safe: call it from one thread (the gateway's event loop).
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence

CONFIRMED = math.inf   # deadline of a confirmed entry: never expires


class GlobalIndex:
    def __init__(self, speculative_ttl: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        if not speculative_ttl >= 0:
            raise ValueError(f"speculative_ttl must be >= 0, got {speculative_ttl}")
        self.speculative_ttl = speculative_ttl
        self._clock = clock
        self._holders: dict[int, dict[str, float]] = {}  # hash -> {worker: deadline}
        self._pages: dict[str, set[int]] = {}            # worker -> hashes it holds
        # (deadline, worker, hash) of speculative inserts, oldest first. An item
        # whose entry was since confirmed, refreshed, removed or cleared is stale:
        # its deadline no longer matches, and the purge skips it.
        self._expiry: deque[tuple[float, str, int]] = deque()

    # ---- events from the workers ----
    def apply_stored(self, worker: str, page_hashes: Sequence[int],
                     parent: int | None) -> bool:
        """Confirm pages that `worker` stored; they chain from `parent` (None: from
        the start of a sequence). A speculative entry becomes permanent.

        Returns False when parent is not None and not a confirmed page of worker:
        the index missed an event of that worker (the pages are stored anyway;
        the caller may resync from a snapshot)."""
        self._purge()
        attached = parent is None or self._holders.get(parent, {}).get(worker) == CONFIRMED
        for h in page_hashes:
            self._set(worker, h, CONFIRMED)
        return attached

    def apply_removed(self, worker: str, page_hashes: Sequence[int]) -> None:
        """`worker` evicted these pages (confirmed or speculative: both go)."""
        self._purge()
        for h in page_hashes:
            self._drop(worker, h)

    def clear(self, worker: str) -> None:
        """Drop every page of `worker`: a `cleared` event, a worker that died or was
        removed, or before applying a fresh snapshot."""
        self._purge()
        for h in self._pages.pop(worker, ()):
            holders = self._holders[h]
            del holders[worker]
            if not holders:
                del self._holders[h]

    # ---- routing ----
    def insert_speculative(self, worker: str, page_hashes: Sequence[int]) -> None:
        """The gateway routed a request with these full-page hashes (a chain from
        the root) to `worker`: count them as held for speculative_ttl seconds,
        unless an apply_stored confirms them first. A confirmed page stays
        confirmed; a speculative one gets a fresh deadline."""
        self._purge()
        deadline = self._clock() + self.speculative_ttl
        for h in page_hashes:
            old = self._holders.get(h, {}).get(worker)
            if old is None or old < deadline:
                self._set(worker, h, deadline)
                self._expiry.append((deadline, worker, h))

    def match(self, page_hashes: Sequence[int]) -> dict[str, int]:
        """Leading pages of the chain `page_hashes` (from the root) that each worker
        holds; only workers with at least one page appear."""
        self._purge()
        counts: dict[str, int] = {}
        if not page_hashes:
            return counts
        live = set(self._holders.get(page_hashes[0], ()))
        for i, h in enumerate(page_hashes):
            if i:
                live.intersection_update(self._holders.get(h, ()))
            if not live:
                break
            for w in live:
                counts[w] = i + 1
        return counts

    # ---- sizes and views ----
    def num_pages(self, worker: str) -> int:
        """Pages of `worker` in the index, live speculative ones included."""
        self._purge()
        return len(self._pages.get(worker, ()))

    def workers(self) -> set[str]:
        """Workers with at least one page in the index."""
        self._purge()
        return set(self._pages)

    def __len__(self) -> int:
        """Distinct page hashes held by some worker."""
        self._purge()
        return len(self._holders)

    def snapshot(self, worker: str) -> set[int]:
        """Confirmed hashes of `worker` (speculative ones left out)."""
        self._purge()
        return {h for h in self._pages.get(worker, ())
                if self._holders[h][worker] == CONFIRMED}

    # ---- internals ----
    def _set(self, worker: str, h: int, deadline: float) -> None:
        self._holders.setdefault(h, {})[worker] = deadline
        self._pages.setdefault(worker, set()).add(h)

    def _drop(self, worker: str, h: int) -> None:
        holders = self._holders.get(h)
        if holders is None or holders.pop(worker, None) is None:
            return
        if not holders:
            del self._holders[h]
        pages = self._pages[worker]
        pages.discard(h)
        if not pages:
            del self._pages[worker]

    def _purge(self) -> None:
        """Drop speculative entries whose deadline has passed (now >= deadline)."""
        now, q = self._clock(), self._expiry
        while q and q[0][0] <= now:
            deadline, worker, h = q.popleft()
            if self._holders.get(h, {}).get(worker) == deadline:
                self._drop(worker, h)

    def check_integrity(self) -> None:
        """Full consistency check (slow; for tests): the two maps mirror each
        other, nothing is empty, and every speculative entry has its expiry item."""
        pending = set(self._expiry)
        pairs = {(w, h) for w, hs in self._pages.items() for h in hs}
        assert all(self._pages.values()), "a worker with no pages is listed"
        assert all(self._holders.values()), "a hash with no holders is listed"
        assert pairs == {(w, h) for h, ws in self._holders.items() for w in ws}, \
            "hash -> workers and worker -> hashes disagree"
        for h, ws in self._holders.items():
            for w, deadline in ws.items():
                assert deadline == CONFIRMED or (deadline, w, h) in pending, (
                    f"speculative page {h:#x} of {w} would never expire")
        deadlines = [d for d, _, _ in self._expiry]
        assert deadlines == sorted(deadlines), "expiry queue out of order"
