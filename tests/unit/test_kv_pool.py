"""PageAllocator and KVPool: unit tests and a property test against a set model."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.engine.kv_pool import KVPool, PageAllocator, slot_tensor, slots_for


# ---- PageAllocator ----

def test_fresh_allocator_reserves_page_zero():
    a = PageAllocator(8)
    assert (a.num_pages, a.num_free, a.num_used) == (8, 7, 0)
    pages = a.alloc(7)
    assert sorted(pages) == list(range(1, 8))
    assert a.alloc(1) is None
    a.check_integrity()


def test_alloc_is_all_or_nothing():
    a = PageAllocator(5)
    assert a.alloc(5) is None
    assert a.num_free == 4
    assert a.alloc(0) == []
    with pytest.raises(ValueError):
        a.alloc(-1)


def test_low_pages_first_and_reuse():
    a = PageAllocator(10)
    assert sorted(a.alloc(3)) == [1, 2, 3]
    a.free([2])
    assert a.alloc(1) == [2]
    a.check_integrity()


def test_double_free_raises_and_frees_nothing():
    a = PageAllocator(6)
    pages = a.alloc(3)
    a.free(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        a.free([pages[1], pages[0]])           # pages[0] is already free
    assert a.is_used(pages[1]) and a.num_free == 3
    with pytest.raises(ValueError):
        a.free([pages[2], pages[2]])           # twice in one call
    assert a.is_used(pages[2])
    with pytest.raises(ValueError):
        a.free([0])                            # the reserved page
    a.check_integrity()


def test_single_page_allocator_has_nothing_to_give():
    a = PageAllocator(1)
    assert a.num_free == 0 and a.alloc(1) is None
    with pytest.raises(ValueError):
        PageAllocator(0)


def test_check_integrity_catches_corruption():
    a = PageAllocator(4)
    a.alloc(1)
    a._free.append(a._free[-1])
    with pytest.raises(AssertionError, match="twice"):
        a.check_integrity()
    b = PageAllocator(4)
    b._free.pop()
    with pytest.raises(AssertionError, match="lost"):
        b.check_integrity()
    c = PageAllocator(4)
    c._used.add(c._free[0])
    with pytest.raises(AssertionError, match="both free and used"):
        c.check_integrity()


class AllocatorMachine(RuleBasedStateMachine):
    N = 12

    def __init__(self):
        super().__init__()
        self.a = PageAllocator(self.N)
        self.held: list[list[int]] = []

    @rule(n=st.integers(0, 6))
    def alloc(self, n):
        free_before = self.a.num_free
        pages = self.a.alloc(n)
        if n > free_before:
            assert pages is None and self.a.num_free == free_before
        else:
            assert len(pages) == n and 0 not in pages
            self.held.append(pages)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.a.free(self.held.pop(i % len(self.held)))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def double_free(self, i):
        pages = self.held[i % len(self.held)]
        if pages:
            with pytest.raises(ValueError):
                self.a.free(pages + pages[:1])

    @invariant()
    def accounted(self):
        self.a.check_integrity()
        held = [p for ps in self.held for p in ps]
        assert len(set(held)) == len(held)
        assert self.a.num_used == len(held) and self.a.num_free == self.N - 1 - len(held)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


# ---- KVPool and slots ----

def test_kvpool_shapes():
    pool = KVPool(num_pages=5, page_size=4, num_layers=3, num_kv_heads=2, head_dim=8,
                  dtype=torch.float16, device="cpu")
    assert len(pool.k_cache) == len(pool.v_cache) == 3
    for t in pool.k_cache + pool.v_cache:
        assert t.shape == (20, 2, 8) and t.dtype == torch.float16 and not t[:4].any()   # page 0 zeroed
    assert pool.k_cache[0].data_ptr() != pool.v_cache[0].data_ptr()
    assert pool.allocator.num_pages == 5 and pool.num_slots == 20


def test_pages_for_budget():
    bpt = 2 * 30 * 3 * 64 * 2
    assert KVPool.pages_for_budget(bpt * 16 * 10 + 5, 16, bpt) == 10
    assert KVPool.pages_for_budget(bpt * 15, 16, bpt) == 0
    assert KVPool.pages_for_budget(-1, 16, bpt) == 0


def test_slots_and_store():
    pool = KVPool(6, 4, 1, 1, 2, torch.float32, "cpu")
    assert slots_for([3, 1], 4, 2, 7) == [14, 15, 4, 5, 6]
    assert slots_for([3, 1], 4, 0, 0) == []
    with pytest.raises(ValueError):
        slots_for([3, 1], 4, 0, 9)
    slots = torch.tensor(slots_for([3, 1], 4, 2, 5))
    k = torch.arange(6, dtype=torch.float32).view(3, 1, 2)
    pool.k_cache[0].zero_()                            # the pool is allocated empty (page 0 aside)
    pool.store(0, slots, k, -k)
    assert torch.equal(pool.k_cache[0][slots], k) and torch.equal(pool.v_cache[0][slots], -k)
    assert pool.k_cache[0].sum() == k.sum()          # nothing else written


@settings(max_examples=100, deadline=None)
@given(page_size=st.integers(1, 8),
       tables=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=5), min_size=1, max_size=4),
       data=st.data())
def test_slot_tensor_matches_slots_for(page_size, tables, data):
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    rows, positions, expected = [], [], []
    for r, t in enumerate(tables):
        pos = data.draw(st.lists(st.integers(0, len(t) * page_size - 1), max_size=6))
        rows += [r] * len(pos)
        positions += pos
        expected += [slots_for(t, page_size, p, p + 1)[0] for p in pos]
    got = slot_tensor(padded, torch.tensor(positions, dtype=torch.long), page_size,
                      rows=torch.tensor(rows, dtype=torch.long))
    assert got.tolist() == expected
    one = torch.tensor(tables[0])
    pos = torch.arange(len(tables[0]) * page_size)
    assert slot_tensor(one, pos, page_size).tolist() == slots_for(tables[0], page_size, 0, len(pos))


def test_slot_tensor_2d_gather():
    table = torch.tensor([[2, 5], [7, 1]])
    pos = torch.tensor([[0, 3], [2, 1]])
    assert slot_tensor(table, pos, 2).tolist() == [[4, 11], [2, 15]]


def test_gather_scatter_round_trip():
    src = KVPool(6, 4, 3, 2, 8, torch.bfloat16, "cpu")
    dst = KVPool(9, 4, 3, 2, 8, torch.bfloat16, "cpu")
    for t in (*src.k_cache, *src.v_cache):
        t.normal_()
    a, b = torch.tensor(slots_for([3, 1, 5], 4, 2, 11)), torch.tensor(slots_for([7, 2, 8], 4, 2, 11))
    kv = src.gather(a)
    assert kv.shape == (9, 3, 2, 2, 8)
    dst.scatter(b, kv)
    for layer in range(3):
        assert torch.equal(dst.k_cache[layer][b], src.k_cache[layer][a])
        assert torch.equal(dst.v_cache[layer][b], src.v_cache[layer][a])
    with pytest.raises(ValueError, match="does not fit"):
        dst.scatter(b, kv[:, :2])
