"""Prefix cache: a radix tree over token ids at page granularity.

Only full pages are cached. An edge holds one or more pages; its key is the
tuple of their token ids (a multiple of page_size long), and a node's children
are keyed by the token ids of their first page. A node also keeps the chained
hash of each of its pages (services.common.page_hash), which names the whole
prefix up to that page: the KV events the gateway's global index is built from
(DESIGN.md section 3).

Page ownership: a page in the tree belongs to the tree, which frees it on
eviction or reset. A request that uses tree pages holds a lock on the deepest
node of its prefix (lock ref counts run along the whole path root..node), and
locked nodes are never evicted. Usage, for a request with token ids `toks`:

    m = cache.match_prefix(toks[:-1])      # never match ALL tokens: the last one
    cache.lock(m.node)                     # must run through the model for logits
    req.pages = m.pages + allocator.alloc(...)   # (evict and retry when None)
    ...compute KV of positions [m.num_tokens, n)...
    # running request, after (a chunk of) prefill: hand its full pages to the tree
    r = cache.insert(toks[:n], req.pages)  # n = positions whose KV is written
    cache.lock(r.node); cache.unlock(m.node)
    req.pages[:len(r.tree_pages)] = r.tree_pages
    allocator.free(r.duplicates)
    # finished request: the same insert, then unlock its node and free its
    # pages past the tree's: allocator.free(r.duplicates + req.pages[len(r.tree_pages):])

The cache matches exactly what it is given. Lock right after match_prefix or
insert, before anything can evict: an unlocked handle dies with its node.
Not thread-safe: call every method (drain_events and snapshot included) from
the engine's thread.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from services.common.page_hash import hash_pages
from services.engine.kv_pool import PageAllocator

STORED, REMOVED, CLEARED = "stored", "removed", "cleared"


@dataclass(frozen=True)
class KVEvent:
    """One change to the set of cached pages. `stored` pages chain from
    parent_hash (None: from the start of a sequence) and token_ids are their
    flat token ids; `removed` lists hashes deepest first; `cleared` drops all."""
    seq: int
    kind: str
    page_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[int, ...] = ()


class RadixNode:
    """A tree node; outside this module, an opaque handle for lock/unlock."""
    __slots__ = ("key", "pages", "hashes", "parent", "children", "lock_ref", "own_locks",
                 "last_access", "id")
    _ids = itertools.count()

    def __init__(self, key: tuple[int, ...], pages: list[int], hashes: list[int],
                 parent: RadixNode | None, last_access: int = 0):
        self.key = key
        self.pages = pages
        self.hashes = hashes            # chained hash of each page, from the root
        self.parent = parent            # None: the root, or a node evicted / reset away
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.lock_ref = 0               # locks taken on this node or any descendant
        self.own_locks = 0              # locks taken with this node as the handle
        self.last_access = last_access
        self.id = next(RadixNode._ids)  # heap tie-break

    @property
    def last_hash(self) -> int | None:
        return self.hashes[-1] if self.hashes else None


@dataclass(frozen=True)
class PrefixMatch:
    pages: list[int]         # the tree's pages of the matched prefix
    num_tokens: int          # len(pages) * page_size
    node: RadixNode          # lock/unlock handle (the root when nothing matched)


@dataclass(frozen=True)
class InsertResult:
    tree_pages: list[int]    # the tree's pages for every full page inserted
    duplicates: list[int]    # caller's pages not adopted: the caller frees them
    node: RadixNode          # handle of the deepest node, covering tree_pages


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, enable_events: bool = True):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.enable_events = enable_events
        self._root = RadixNode((), [], [], None)
        self._leaves: set[RadixNode] = set()   # childless nodes, root excluded
        self._evictable = 0                    # pages in nodes with lock_ref == 0
        self._locked = 0                       # pages in nodes with lock_ref > 0
        self._clock = 0
        self._seq = 0                          # seq of the last event emitted
        self._events: list[KVEvent] = []

    # ---- sizes (pages) ----
    @property
    def evictable_pages(self) -> int:
        return self._evictable

    @property
    def locked_pages(self) -> int:
        return self._locked

    @property
    def total_pages(self) -> int:
        return self._evictable + self._locked

    # ---- lookup and insertion ----
    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of the full pages of token_ids."""
        node, pages = self._walk(self._full_pages(token_ids))
        self._touch(node)
        return PrefixMatch(pages, len(pages) * self.page_size, node)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> InsertResult:
        """Cache the full pages of token_ids, whose KV lives in `pages` (one per
        page; pages past the full ones are ignored). Where the tree already has
        a page, the caller's (if a different id) comes back in `duplicates`."""
        tokens = self._full_pages(token_ids)
        n = len(tokens) // self.page_size
        if len(pages) < n:
            raise ValueError(f"{len(pages)} pages cannot hold {n} full pages of tokens")
        node, tree_pages = self._walk(tokens)
        duplicates = [p for p, t in zip(pages, tree_pages) if p != t]
        if len(tree_pages) < n:
            node = self._add_leaf(node, tokens[len(tree_pages) * self.page_size:],
                                  list(pages[len(tree_pages):n]))
            tree_pages += node.pages
        self._touch(node)
        return InsertResult(tree_pages, duplicates, node)

    def _full_pages(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        return tuple(token_ids[:len(token_ids) - len(token_ids) % self.page_size])

    def _walk(self, tokens: tuple[int, ...]) -> tuple[RadixNode, list[int]]:
        """Deepest node matching a prefix of tokens (splitting the edge where the
        match ends inside it), and the pages of the path to it."""
        node, pos, pages, ps = self._root, 0, [], self.page_size
        while pos < len(tokens):
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                break
            m = self._common_len(child.key, tokens, pos)
            if m < len(child.key):
                child = self._split(child, m)
            pages += child.pages
            node, pos = child, pos + m
        return node, pages

    def _common_len(self, key: tuple[int, ...], tokens: tuple[int, ...], pos: int) -> int:
        """Tokens of key matching tokens[pos:], rounded down to whole pages."""
        n = min(len(key), len(tokens) - pos)
        if key[:n] == tokens[pos:pos + n]:
            return n
        i = next(i for i, (a, b) in enumerate(zip(key, tokens[pos:pos + n])) if a != b)
        return i - i % self.page_size

    def _split(self, node: RadixNode, m: int) -> RadixNode:
        """Cut node's edge after m tokens; the new upper node is returned. The
        original object keeps the tail, so outstanding handles keep their path."""
        k, ps = m // self.page_size, self.page_size
        upper = RadixNode(node.key[:m], node.pages[:k], node.hashes[:k], node.parent,
                          node.last_access)
        upper.lock_ref = node.lock_ref
        node.parent.children[node.key[:ps]] = upper
        node.key, node.pages, node.hashes = node.key[m:], node.pages[k:], node.hashes[k:]
        node.parent = upper
        upper.children[node.key[:ps]] = node
        return upper

    def _add_leaf(self, parent: RadixNode, key: tuple[int, ...], pages: list[int]) -> RadixNode:
        hashes = hash_pages(key, self.page_size, parent.last_hash)
        leaf = RadixNode(key, pages, hashes, parent)
        parent.children[key[:self.page_size]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self._evictable += len(pages)
        self._emit(STORED, tuple(hashes), parent.last_hash, key)
        return leaf

    def _touch(self, node: RadixNode | None) -> None:
        self._clock += 1
        while node is not None:
            node.last_access = self._clock
            node = node.parent

    # ---- locks ----
    def lock(self, node: RadixNode) -> None:
        if node.parent is None and node is not self._root:
            raise ValueError("lock of a node no longer in the cache (lock right after match)")
        node.own_locks += 1
        while node is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.pages)
                self._locked += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        if node.own_locks <= 0:
            raise ValueError("unlock of a node that this handle did not lock (underflow)")
        node.own_locks -= 1
        while node is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked -= len(node.pages)
                self._evictable += len(node.pages)
            node = node.parent

    # ---- eviction ----
    def evict(self, num_pages: int) -> int:
        """Free up to num_pages of the least recently used unlocked pages, leaves
        first (a leaf's tail pages go first when only part of it is needed)."""
        heap = [(n.last_access, n.id, n) for n in self._leaves if n.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        removed: list[int] = []
        while heap and len(freed) < num_pages:
            leaf = heapq.heappop(heap)[2]
            keep = len(freed) + len(leaf.pages) - num_pages
            if keep > 0:
                self._split(leaf, keep * self.page_size)
            parent = leaf.parent
            self._remove_leaf(leaf, freed, removed)
            if parent in self._leaves and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        if freed:
            self.allocator.free(freed)
            self._emit(REMOVED, tuple(removed), None)
        return len(freed)

    def _remove_leaf(self, leaf: RadixNode, freed: list[int], removed: list[int]) -> None:
        parent = leaf.parent
        del parent.children[leaf.key[:self.page_size]]
        leaf.parent = None
        self._leaves.discard(leaf)
        if not parent.children and parent is not self._root:
            self._leaves.add(parent)
        self._evictable -= len(leaf.pages)
        freed += leaf.pages
        removed += reversed(leaf.hashes)

    def reset(self) -> None:
        """Free every page of the tree. Nothing may be locked."""
        if self._root.lock_ref:
            raise RuntimeError(f"reset of a radix cache with {self._root.lock_ref} locks held")
        pages = []
        for _, node in self._iter_edges():
            pages += node.pages
            node.parent = None
        self._root.children.clear()
        self._leaves.clear()
        self._evictable = self._locked = 0
        self.allocator.free(pages)
        self._emit(CLEARED, (), None)

    # ---- KV events ----
    def _emit(self, kind: str, hashes: tuple[int, ...], parent: int | None,
              tokens: tuple[int, ...] = ()) -> None:
        if self.enable_events:
            self._seq += 1
            self._events.append(KVEvent(self._seq, kind, hashes, parent, tokens))

    def drain_events(self) -> list[KVEvent]:
        """Events since the last drain, in seq order (consecutive seqs)."""
        events, self._events = self._events, []
        return events

    def snapshot(self) -> tuple[int, list[KVEvent]]:
        """(seq, stored events of the whole tree, parents first). The tree is the
        state after event `seq`: a new subscriber applies only events > seq."""
        return self._seq, [KVEvent(self._seq, STORED, tuple(n.hashes), p.last_hash, n.key)
                           for p, n in self._iter_edges()]

    # ---- checks ----
    def _iter_edges(self) -> Iterator[tuple[RadixNode, RadixNode]]:
        """(parent, node) for every node but the root, parents first."""
        stack = [self._root]
        while stack:
            parent = stack.pop()
            for node in parent.children.values():
                yield parent, node
                stack.append(node)

    def check_integrity(self) -> None:
        """Full structural check (slow: walks and rehashes the tree)."""
        root, seen, leaves = self._root, set(), set()
        locked = evictable = 0
        assert root.key == () and not root.pages and root.parent is None, "root corrupted"
        self._check_locks(root)
        for parent, node in self._iter_edges():
            self._check_node(parent, node)
            self._check_locks(node)
            for p in node.pages:
                assert p not in seen, f"page {p} twice in the tree"
                assert self.allocator.is_used(p), f"tree page {p} is not allocated"
                seen.add(p)
            if node.lock_ref:
                locked += len(node.pages)
            else:
                evictable += len(node.pages)
            if not node.children:
                leaves.add(node)
        assert leaves == self._leaves, "leaf set out of date"
        assert (locked, evictable) == (self._locked, self._evictable), (
            f"counters (locked, evictable) = {(self._locked, self._evictable)}, "
            f"tree has {(locked, evictable)}")
        seqs = [e.seq for e in self._events]
        assert seqs == list(range(self._seq - len(seqs) + 1, self._seq + 1)), "event seqs not consecutive"

    def _check_node(self, parent: RadixNode, node: RadixNode) -> None:
        ps, where = self.page_size, f"node {node.id} (key {node.key[:8]}...)"
        assert node.parent is parent, f"{where}: wrong parent link"
        assert node.key and len(node.key) % ps == 0, f"{where}: edge of {len(node.key)} tokens"
        assert parent.children.get(node.key[:ps]) is node, f"{where}: wrong child key"
        assert len(node.pages) * ps == len(node.key), f"{where}: pages do not cover the key"
        assert node.hashes == hash_pages(node.key, ps, parent.last_hash), f"{where}: bad hashes"
        assert node.last_access <= parent.last_access, f"{where}: newer than its parent"

    @staticmethod
    def _check_locks(node: RadixNode) -> None:
        below = sum(c.lock_ref for c in node.children.values())
        assert node.own_locks >= 0, f"node {node.id}: negative lock count"
        assert node.lock_ref == node.own_locks + below, (
            f"node {node.id}: lock_ref {node.lock_ref} != own {node.own_locks} + below {below}")
