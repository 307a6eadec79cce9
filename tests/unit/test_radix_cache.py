"""RadixCache (and page_hash): unit tests, and a property test of random request
workloads against a naive model: a dict from full-page token prefixes to pages."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.common.page_hash import hash_pages, page_hash
from services.engine.kv_pool import PageAllocator
from services.engine.radix_cache import KVEvent, RadixCache


# ---- page_hash ----

def test_page_hash_is_stable_and_chained():
    h1 = page_hash(None, [1, 2, 3, 4])
    assert h1 == page_hash(None, (1, 2, 3, 4)) and 0 <= h1 < 2**64
    assert h1 == 0x17BA2552C3BC520C             # pinned: the wire format must never drift
    assert page_hash(h1, [5, 6]) != page_hash(None, [5, 6])
    assert page_hash(0, [5, 6]) != page_hash(None, [5, 6])
    assert page_hash(None, [1, 2]) != page_hash(None, [2, 1])
    with pytest.raises(ValueError):
        page_hash(None, [-1])


def test_hash_pages_covers_full_pages_only():
    toks = list(range(10))
    hs = hash_pages(toks, 4)
    assert len(hs) == 2
    assert hs[0] == page_hash(None, toks[:4]) and hs[1] == page_hash(hs[0], toks[4:8])
    assert hash_pages(toks[4:8], 4, parent=hs[0]) == hs[1:]
    assert hash_pages(toks[:3], 4) == []
    assert hash_pages(toks, 1)[-1] == hash_pages(toks, 1, None)[-1]


GOLDEN_CODE = "from services.common.page_hash import hash_pages; print(hash_pages(list(range(8)), 4))"


def test_page_hash_golden_across_processes():
    expected = hash_pages(list(range(8)), 4)
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", GOLDEN_CODE], env=env, check=True,
                             capture_output=True, text=True, cwd=os.getcwd()).stdout
        assert out.strip() == str(expected)
    assert expected == [15455600225011477650, 9820034471667979318]
    # blake2b(digest_size=8) over b"\x00" + uint32 LE tokens: pinned so that it never drifts
    import hashlib, struct
    h = hashlib.blake2b(b"\x00" + struct.pack("<4I", 0, 1, 2, 3), digest_size=8).digest()
    assert expected[0] == int.from_bytes(h, "little")


# ---- RadixCache: units ----

def make(page_size=2, num_pages=32, events=True):
    a = PageAllocator(num_pages)
    return a, RadixCache(a, page_size, enable_events=events)


def cached(a, c, tokens):
    """Insert tokens with freshly allocated pages (like a finished request)."""
    n = -(-len(tokens) // c.page_size)
    pages = a.alloc(n)
    r = c.insert(tokens, pages)
    a.free(r.duplicates + pages[len(r.tree_pages):])
    return r


def test_empty_match_is_root():
    a, c = make()
    m = c.match_prefix([1, 2, 3])
    assert (m.pages, m.num_tokens) == ([], 0)
    c.lock(m.node)
    c.unlock(m.node)
    c.check_integrity()


def test_insert_then_match_and_partial_page():
    a, c = make(page_size=2)
    r = cached(a, c, [1, 2, 3, 4, 5])
    assert len(r.tree_pages) == 2 and r.duplicates == []
    assert c.total_pages == 2 and a.num_used == 2
    m = c.match_prefix([1, 2, 3, 4, 5, 6])
    assert m.pages == r.tree_pages and m.num_tokens == 4
    assert c.match_prefix([1, 2, 3]).pages == r.tree_pages[:1]      # the match splits the edge
    assert c.match_prefix([1, 3]).pages == []
    c.check_integrity()


def test_insert_reports_duplicates_and_keeps_tree_pages():
    a, c = make(page_size=2)
    first = cached(a, c, [1, 2, 3, 4])
    mine = a.alloc(3)
    r = c.insert([1, 2, 3, 4, 5, 6], [first.tree_pages[0], mine[1], mine[2]])
    assert r.duplicates == [mine[1]]
    assert r.tree_pages == first.tree_pages + [mine[2]]
    a.free(r.duplicates + [mine[0]])
    c.check_integrity()
    a.check_integrity()
    with pytest.raises(ValueError):
        c.insert([1, 2, 3, 4], [first.tree_pages[0]])


def test_lock_protects_from_eviction_and_underflow_raises():
    a, c = make(page_size=1)
    cached(a, c, [1, 2, 3])
    cached(a, c, [1, 2, 9])
    m = c.match_prefix([1, 2, 3])
    c.lock(m.node)
    assert c.locked_pages == 3 and c.evictable_pages == 1
    assert c.evict(10) == 1
    assert c.match_prefix([1, 2, 9]).num_tokens == 2
    c.unlock(m.node)
    with pytest.raises(ValueError, match="underflow"):
        c.unlock(m.node)
    assert c.evict(10) == 3 and a.num_free == a.num_pages - 1
    with pytest.raises(ValueError, match="no longer"):
        c.lock(m.node)
    c.check_integrity()


def test_split_of_a_locked_edge_keeps_it_locked():
    a, c = make(page_size=2)
    r = cached(a, c, [1, 2, 3, 4, 5, 6])
    c.lock(r.node)
    m = c.match_prefix([1, 2, 3])            # splits the locked edge after one page
    assert m.pages == r.tree_pages[:1] and c.locked_pages == 3
    c.check_integrity()
    assert c.evict(10) == 0
    c.unlock(r.node)
    assert c.locked_pages == 0 and c.evictable_pages == 3
    c.check_integrity()


def test_evict_is_lru_and_frees_exactly():
    a, c = make(page_size=2)
    old = cached(a, c, [1, 1, 1, 1, 1, 1])
    new = cached(a, c, [2, 2, 2, 2, 2, 2])
    c.match_prefix([1, 1])                     # splits `old`: its tail stays least recent
    assert c.evict(1) == 1
    assert sorted(tree_items(c).values()) == sorted(old.tree_pages[:2] + new.tree_pages)
    c.match_prefix([1] * 6)                    # now all of `old` is more recent than `new`
    assert c.evict(2) == 2                     # the tail of `new` goes, in part
    assert sorted(tree_items(c).values()) == sorted(old.tree_pages[:2] + new.tree_pages[:1])
    assert c.evict(2) == 2                     # the rest of `new`, then the tail of `old`
    assert list(tree_items(c).values()) == old.tree_pages[:1]
    c.check_integrity()
    assert c.evict(0) == 0 and c.evict(100) == 1 and c.total_pages == 0


def test_reset_frees_all_and_refuses_with_locks():
    a, c = make(page_size=4)
    cached(a, c, list(range(12)))
    m = c.match_prefix(list(range(8)))
    c.lock(m.node)
    with pytest.raises(RuntimeError):
        c.reset()
    c.unlock(m.node)
    c.reset()
    assert a.num_free == a.num_pages - 1 and c.total_pages == 0
    assert c.drain_events()[-1].kind == "cleared"
    c.check_integrity()


def test_events_stored_removed_and_snapshot():
    a, c = make(page_size=2)
    cached(a, c, [1, 2, 3, 4])
    cached(a, c, [1, 2, 5, 6, 7])
    ev = c.drain_events()
    h = hash_pages([1, 2, 3, 4], 2)
    assert ev[0] == KVEvent(1, "stored", tuple(h), None, (1, 2, 3, 4))
    assert ev[1] == KVEvent(2, "stored", (page_hash(h[0], [5, 6]),), h[0], (5, 6))
    assert c.drain_events() == []
    seq, snap = c.snapshot()
    assert seq == 2 and [e.page_hashes for e in snap][0] == (h[0],)   # split: parents first
    assert {x for e in snap for x in e.page_hashes} == {*h, page_hash(h[0], [5, 6])}
    c.evict(1)
    (removed,) = c.drain_events()
    assert removed.kind == "removed" and removed.seq == 3 and len(removed.page_hashes) == 1


def test_events_can_be_disabled():
    a, c = make(events=False)
    cached(a, c, [1, 2, 3, 4])
    c.evict(5)
    assert c.drain_events() == [] and c.snapshot() == (0, [])


# ---- RadixCache: property test against a naive model ----

@dataclass
class Req:
    tokens: list[int]
    pages: list[int]       # page table; pages[:num_tree] belong to the tree
    node: object           # the locked handle
    num_tree: int


def tree_items(cache):
    """{full-page token prefix: page} read out of the tree."""
    out, stack = {}, [(cache._root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            key = prefix
            for i, page in enumerate(child.pages):
                key = prefix + child.key[:(i + 1) * cache.page_size]
                out[key] = page
            stack.append((child, key))
    return out


class CacheMachine(RuleBasedStateMachine):
    PAGE_SIZE = 4
    NUM_PAGES = 24
    MAX_LEN = 22

    def __init__(self):
        super().__init__()
        self.ps = self.PAGE_SIZE
        self.alloc = PageAllocator(self.NUM_PAGES)
        self.cache = RadixCache(self.alloc, self.ps)
        self.model: dict[tuple[int, ...], int] = {}
        self.reqs: list[Req] = []
        self.replayed: set[int] = set()
        self.last_seq = 0

    # -- model helpers --
    def model_match(self, tokens):
        pages, ps = [], self.ps
        while (len(pages) + 1) * ps <= len(tokens):
            page = self.model.get(tuple(tokens[:(len(pages) + 1) * ps]))
            if page is None:
                break
            pages.append(page)
        return pages

    def alloc_or_evict(self, n):
        pages = self.alloc.alloc(n)
        if pages is None:
            self.do_evict(n - self.alloc.num_free)
            pages = self.alloc.alloc(n)
        return pages

    def do_evict(self, k):
        before, model_before = self.cache.evictable_pages, len(self.model)
        freed = self.cache.evict(k)
        assert freed == max(0, min(k, before))
        self.model = {key: p for key, p in self.model.items() if self.alloc.is_used(p)}
        assert len(self.model) == model_before - freed

    def insert(self, req):
        n = len(req.tokens) // self.ps
        exp_tree, exp_dup = [], []
        for i in range(n):
            key = tuple(req.tokens[:(i + 1) * self.ps])
            tree = self.model.setdefault(key, req.pages[i])
            exp_tree.append(tree)
            if tree != req.pages[i]:
                exp_dup.append(req.pages[i])
        r = self.cache.insert(req.tokens, req.pages)
        assert (r.tree_pages, r.duplicates) == (exp_tree, exp_dup)
        return r

    def pick(self, i):
        return self.reqs[i % len(self.reqs)]

    # -- rules --
    @rule(data=st.data())
    def start_request(self, data):
        tokens = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=self.MAX_LEN))
        m = self.cache.match_prefix(tokens[:-1])
        assert m.pages == self.model_match(tokens[:-1]) and m.num_tokens == len(m.pages) * self.ps
        self.cache.lock(m.node)
        own = self.alloc_or_evict(-(-len(tokens) // self.ps) - len(m.pages))
        if own is None:
            self.cache.unlock(m.node)
            return
        self.reqs.append(Req(tokens, m.pages + own, m.node, len(m.pages)))

    @rule(data=st.data())
    def match_only(self, data):
        tokens = data.draw(st.lists(st.integers(0, 2), max_size=self.MAX_LEN))
        assert self.cache.match_prefix(tokens).pages == self.model_match(tokens)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 99), token=st.integers(0, 2))
    def decode_token(self, i, token):
        req = self.pick(i)
        if len(req.tokens) == len(req.pages) * self.ps:
            page = self.alloc_or_evict(1)
            if page is None:
                return self.finish(i, False)   # retracted: no room to grow
            req.pages += page
        req.tokens.append(token)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 99))
    def insert_running(self, i):
        req = self.pick(i)
        r = self.insert(req)
        self.cache.lock(r.node)
        self.cache.unlock(req.node)
        req.pages[:len(r.tree_pages)] = r.tree_pages
        self.alloc.free(r.duplicates)
        req.node, req.num_tree = r.node, len(r.tree_pages)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 99), cache_it=st.booleans())
    def finish(self, i, cache_it):
        req = self.reqs.pop(i % len(self.reqs))
        if cache_it:
            r = self.insert(req)
            self.alloc.free(r.duplicates + req.pages[len(r.tree_pages):])
        else:                                  # abort: only its own pages go
            self.alloc.free(req.pages[req.num_tree:])
        self.cache.unlock(req.node)

    @rule(k=st.integers(0, 8))
    def evict(self, k):
        self.do_evict(k)

    @precondition(lambda self: not self.reqs)
    @rule()
    def reset(self):
        self.cache.reset()
        self.model.clear()

    # -- invariants --
    @invariant()
    def structure(self):
        self.cache.check_integrity()
        self.alloc.check_integrity()
        assert tree_items(self.cache) == self.model

    @invariant()
    def every_page_accounted_for(self):
        free = [p for p in range(1, self.NUM_PAGES) if self.alloc.is_free(p)]
        tree = list(self.model.values())
        own = [p for r in self.reqs for p in r.pages[r.num_tree:]]
        everything = free + tree + own
        assert sorted(everything) == list(range(1, self.NUM_PAGES)), "page lost or shared"
        locked = {p for r in self.reqs for p in r.pages[:r.num_tree]}
        assert locked <= set(tree)
        assert self.cache.total_pages == len(tree) and self.cache.locked_pages == len(locked)

    @invariant()
    def events_replay_to_snapshot(self):
        self.replay(self.cache.drain_events())
        seq, snap = self.cache.snapshot()
        assert seq == self.last_seq
        snap_hashes = set()
        for e in snap:
            assert e.kind == "stored" and (e.parent_hash is None or e.parent_hash in snap_hashes)
            assert list(e.page_hashes) == hash_pages(e.token_ids, self.ps, e.parent_hash)
            snap_hashes.update(e.page_hashes)
        assert self.replayed == snap_hashes
        assert snap_hashes == {hash_pages(key, self.ps)[-1] for key in self.model}

    def replay(self, events):
        for e in events:
            assert e.seq == self.last_seq + 1
            self.last_seq = e.seq
            if e.kind == "stored":
                assert e.parent_hash is None or e.parent_hash in self.replayed
                assert not self.replayed & set(e.page_hashes)
                self.replayed.update(e.page_hashes)
            elif e.kind == "removed":
                assert set(e.page_hashes) <= self.replayed
                self.replayed -= set(e.page_hashes)
            else:
                assert e.kind == "cleared"
                self.replayed.clear()

    def teardown(self):
        for _ in range(len(self.reqs)):
            self.finish(0, True)
        if self.last_seq % 2:
            assert self.cache.evict(self.NUM_PAGES) == len(self.model)
        else:
            self.cache.reset()
        self.cache.check_integrity()
        assert self.alloc.num_free == self.NUM_PAGES - 1 and self.cache.total_pages == 0
        self.replay(self.cache.drain_events())
        assert self.replayed == set()


class CacheMachinePage1(CacheMachine):
    PAGE_SIZE = 1
    NUM_PAGES = 16
    MAX_LEN = 8


SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestCachePage4 = CacheMachine.TestCase
TestCachePage4.settings = SETTINGS
TestCachePage1 = CacheMachinePage1.TestCase
TestCachePage1.settings = SETTINGS
