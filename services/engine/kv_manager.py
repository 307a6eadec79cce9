"""Pages of each request: prefix reuse, allocation with eviction, release.

The one object that moves pages between the allocator, the radix cache and
requests. Invariant: req.pages[:cached_len // ps] belong to the radix cache
(pinned by the lock on req.cache_node); every later page is the request's
own and is freed or handed to the cache when the request leaves.
"""
from __future__ import annotations

from .kv_pool import KVPool
from .radix_cache import RadixCache
from .request import Request


class KVManager:
    def __init__(self, pool: KVPool, page_size: int, enable_prefix_cache: bool = True,
                 kv_events: bool = False):
        self.pool = pool
        self.ps = page_size
        self.allocator = pool.allocator
        self.cache = RadixCache(self.allocator, page_size, enable_events=kv_events) \
            if enable_prefix_cache else None

    # -- capacity ----------------------------------------------------------------------------
    def available_pages(self) -> int:
        return self.allocator.num_free + (self.cache.evictable_pages if self.cache else 0)

    def pages_needed(self, req: Request, upto: int) -> int:
        return max(0, -(-upto // self.ps) - len(req.pages))

    def prefix_len(self, token_ids: list[int]) -> int:
        """Cached prefix length of a prompt (for scheduling policies; locks nothing)."""
        return self.cache.match_prefix(token_ids[:-1]).num_tokens if self.cache else 0

    # -- lifecycle ---------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Reuse the longest cached prefix of everything but the last token."""
        assert not req.pages and req.cache_node is None
        req.num_computed = req.cached_len = 0
        if self.cache is None:
            return
        m = self.cache.match_prefix(req.all_ids[:-1])
        self.cache.lock(m.node)
        req.cache_node, req.pages = m.node, list(m.pages)
        req.page_table_synced = 0
        req.num_computed = req.cached_len = m.num_tokens

    def ensure_pages(self, req: Request, upto: int) -> bool:
        """Give `req` pages for positions [0, upto); False (nothing changed) if memory lacks."""
        n = self.pages_needed(req, upto)
        if n == 0:
            return True
        if self.allocator.num_free < n and self.cache is not None:
            self.cache.evict(n - self.allocator.num_free)
        pages = self.allocator.alloc(n)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def cache_prefix(self, req: Request) -> None:
        """Share the request's computed full pages through the cache while it runs."""
        if self.cache is None:
            return
        full = req.num_computed // self.ps * self.ps
        if full <= req.cached_len:
            return
        tokens = req.all_ids[:full]
        res = self.cache.insert(tokens, req.pages[:full // self.ps])
        self.cache.lock(res.node)
        self.cache.unlock(req.cache_node)
        req.pages[:len(res.tree_pages)] = res.tree_pages    # repoint before the duplicates are reused
        if res.duplicates:
            req.page_table_synced = 0                         # the device row must be rewritten
        self.allocator.free(res.duplicates)
        req.cache_node, req.cached_len = res.node, len(res.tree_pages) * self.ps

    def release(self, req: Request, keep: bool = True) -> None:
        """Free every page the request holds; with `keep`, its computed full pages
        go to the cache instead (for later hits) and stay evictable."""
        if self.cache is not None:
            if keep:
                self.cache_prefix(req)
            self.cache.unlock(req.cache_node)
        own = req.pages[req.cached_len // self.ps:] if self.cache is not None else req.pages
        self.allocator.free(own)
        req.pages, req.cache_node = [], None
        req.page_table_synced = 0
        req.num_computed = req.cached_len = 0

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        if self.cache is not None:
            self.cache.check_integrity()
