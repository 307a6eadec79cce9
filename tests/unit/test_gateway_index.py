"""GlobalIndex and the routing policies: unit tests, and a property test of random
KV event / speculative insert / clock sequences against a naive model: a dict
per worker from page hash to deadline (math.inf when confirmed)."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.common.page_hash import hash_pages
from services.gateway.index import GlobalIndex
from services.gateway.policies import (Candidate, Policy, make_policy, policy_names,
                                       register_policy)

PS = 4   # page size of the unit tests


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def chain(*pages: int) -> list[int]:
    """Hashes of a prompt whose i-th page is PS copies of pages[i]."""
    return hash_pages([p for p in pages for _ in range(PS)], PS)


# ---- GlobalIndex: units ----

def test_hash_pages_values_are_pinned():
    """Workers and gateways of different versions must agree: the values are fixed, and
    the packed path equals page_hash page after page; bad ids raise ValueError."""
    from services.common.page_hash import page_hash
    ids = list(range(32))
    assert hash_pages(ids, 16) == [11097673317877869541, 15193378338462289416]
    assert hash_pages(ids + [7, 8, 9], 16) == hash_pages(ids, 16)        # a partial tail page is ignored
    assert hash_pages(ids[16:], 16, page_hash(None, ids[:16])) == hash_pages(ids, 16)[1:]
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="2\\*\\*32"):
            hash_pages([bad] * 16, 16)


def test_match_counts_leading_pages_of_hash_pages_chains():
    idx = GlobalIndex()
    a, b = chain(1, 2, 3), chain(1, 2, 4, 5)
    assert a[:2] == b[:2] and a[2] != b[2]
    assert idx.apply_stored("w1", a, None)
    assert idx.apply_stored("w2", b[:2], None) and idx.apply_stored("w2", b[2:], b[1])
    assert idx.match(a) == {"w1": 3, "w2": 2}
    assert idx.match(b) == {"w1": 2, "w2": 4}
    assert idx.match(a + [12345]) == {"w1": 3, "w2": 2}       # a partial tail prompt
    assert idx.match(chain(9, 2, 3)) == {}                    # same tokens after page 0,
    assert idx.match(chain(2, 3)) == {}                       # other prefix: other hashes
    assert idx.match([]) == {}
    assert len(idx) == 5 and idx.workers() == {"w1", "w2"}
    assert idx.num_pages("w1") == 3 and idx.num_pages("w2") == 4 and idx.num_pages("w9") == 0


def test_match_stops_at_a_workers_first_missing_page():
    idx = GlobalIndex()
    c = chain(1, 2, 3, 4)
    idx.apply_stored("w", c, None)
    idx.apply_removed("w", [c[1]])                # a stale deeper entry never counts
    assert idx.match(c) == {"w": 1}
    idx.apply_removed("w", [c[0]])
    assert idx.match(c) == {}
    assert idx.snapshot("w") == {c[2], c[3]}


def test_apply_stored_reports_an_unknown_parent():
    idx = GlobalIndex()
    c = chain(1, 2, 3)
    assert not idx.apply_stored("w", c[1:], c[0])     # missed the event of page 0
    assert idx.snapshot("w") == set(c[1:])            # stored anyway
    assert idx.apply_stored("w", c[:1], None) and idx.apply_stored("w", c[2:], c[1])
    assert not idx.apply_stored("v", c[2:], c[1])     # parent held by another worker only
    idx.insert_speculative("u", c[:1])
    assert not idx.apply_stored("u", c[1:2], c[0])    # a speculative parent is no proof


def test_clear_drops_one_worker_only():
    idx = GlobalIndex()
    a, b = chain(1, 2), chain(1, 3)
    idx.apply_stored("w1", a, None)
    idx.apply_stored("w2", a + b[1:], None)
    idx.insert_speculative("w1", b)
    idx.clear("w1")
    idx.clear("nobody")
    assert idx.workers() == {"w2"} and idx.num_pages("w1") == 0 and idx.snapshot("w1") == set()
    assert idx.match(a) == {"w2": 2} and idx.match(b) == {"w2": 2}
    assert len(idx) == 3
    idx.check_integrity()


def test_speculative_entries_expire_after_the_ttl():
    clock = FakeClock()
    idx = GlobalIndex(speculative_ttl=2.0, clock=clock)
    c = chain(1, 2, 3)
    idx.insert_speculative("w", c)
    assert idx.match(c) == {"w": 3} and idx.num_pages("w") == 3
    assert idx.snapshot("w") == set()                 # not confirmed
    clock.t += 1.999
    assert idx.match(c) == {"w": 3}
    clock.t += 0.001
    assert idx.match(c) == {} and len(idx) == 0 and idx.workers() == set()
    assert not idx._expiry                            # purged, not only hidden
    idx.check_integrity()


def test_speculative_insert_refreshes_and_never_downgrades():
    clock = FakeClock()
    idx = GlobalIndex(speculative_ttl=2.0, clock=clock)
    c = chain(1, 2, 3)
    idx.apply_stored("w", c[:1], None)
    idx.insert_speculative("w", c[:2])
    clock.t += 1.5
    idx.insert_speculative("w", c)                    # page 1 gets a fresh deadline
    clock.t += 1.0                                    # past page 1's first deadline
    assert idx.match(c) == {"w": 3}
    clock.t += 1.0
    assert idx.match(c) == {"w": 1}                   # the confirmed page stays
    assert idx.snapshot("w") == {c[0]}
    idx.check_integrity()


def test_stored_confirms_speculative_pages():
    clock = FakeClock()
    idx = GlobalIndex(speculative_ttl=2.0, clock=clock)
    c = chain(1, 2, 3)
    idx.insert_speculative("w", c)
    assert idx.apply_stored("w", c[:2], None)
    clock.t += 60
    assert idx.match(c) == {"w": 2} and idx.snapshot("w") == set(c[:2])
    idx.insert_speculative("w", c)
    idx.apply_removed("w", c[1:])                     # removal takes speculative pages too
    assert idx.match(c) == {"w": 1}
    clock.t += 60
    assert idx.match(c) == {"w": 1}                   # and the stale expiry item is harmless
    idx.check_integrity()


def test_zero_ttl_disables_speculation():
    idx = GlobalIndex(speculative_ttl=0.0, clock=FakeClock())
    idx.insert_speculative("w", chain(1))
    assert idx.match(chain(1)) == {} and len(idx) == 0
    with pytest.raises(ValueError):
        GlobalIndex(speculative_ttl=-1.0)


def test_memory_stays_bounded_under_many_speculative_inserts():
    clock = FakeClock()
    idx = GlobalIndex(speculative_ttl=2.0, clock=clock)
    stable = chain(7, 7)
    idx.apply_stored("w0", stable, None)
    for i in range(5000):
        clock.t += 1 / 16                             # 32 inserts of 2 pages alive at once
        idx.insert_speculative(f"w{i % 3}", hash_pages([i] * 2 * PS, PS))
        idx.insert_speculative("w0", stable)          # confirmed: adds nothing
        assert len(idx._expiry) <= 64 and len(idx) <= 66
    clock.t += 2.0
    assert len(idx) == 2 and len(idx._expiry) == 0 and idx.match(stable) == {"w0": 2}


def test_snapshot_rebuilds_the_same_index():
    clock = FakeClock()
    live = GlobalIndex(clock=clock)
    prompts = [chain(1, 2, 3), chain(1, 2, 4), chain(5, 6), chain(1, 9)]
    live.apply_stored("a", prompts[0], None)
    live.apply_stored("a", prompts[1][2:], prompts[1][1])
    live.apply_stored("b", prompts[2], None)
    live.apply_removed("a", [prompts[0][2]])
    live.insert_speculative("b", prompts[3])
    clock.t += 10                                     # speculative pages gone
    rebuilt = GlobalIndex(clock=clock)
    for w in live.workers():
        rebuilt.apply_stored(w, sorted(live.snapshot(w)), None)
    for p in prompts:
        assert rebuilt.match(p) == live.match(p)
    assert len(rebuilt) == len(live) and rebuilt.workers() == live.workers() == {"a", "b"}


# ---- GlobalIndex: property test against a naive model ----

WORKERS = ("w0", "w1", "w2")
TTL = 2.0
# prompts of 0..4 pages over a 3-letter alphabet: many shared prefixes
prompts = st.lists(st.integers(0, 2), max_size=4).map(lambda p: chain(*p))


class IndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.idx = GlobalIndex(speculative_ttl=TTL, clock=self.clock)
        self.model: dict[str, dict[int, float]] = {w: {} for w in WORKERS}
        self.seen: list[list[int]] = []                 # prompts used, for match checks

    def live(self, w: str) -> dict[int, float]:
        return {h: d for h, d in self.model[w].items() if d > self.clock.t}

    def part(self, c: list[int], start: int, length: int) -> tuple[list[int], int | None]:
        start = min(start, len(c))
        self.seen.append(c)
        return c[start:start + length], (c[start - 1] if start else None)

    @rule(w=st.sampled_from(WORKERS), c=prompts, start=st.integers(0, 4), n=st.integers(0, 4))
    def stored(self, w, c, start, n):
        hs, parent = self.part(c, start, n)
        attached = parent is None or self.live(w).get(parent) == math.inf
        assert self.idx.apply_stored(w, hs, parent) == attached
        self.model[w].update(dict.fromkeys(hs, math.inf))

    @rule(w=st.sampled_from(WORKERS), c=prompts, start=st.integers(0, 4), n=st.integers(0, 4))
    def removed(self, w, c, start, n):
        hs, _ = self.part(c, start, n)
        self.idx.apply_removed(w, hs)
        for h in hs:
            self.model[w].pop(h, None)

    @rule(w=st.sampled_from(WORKERS))
    def clear(self, w):
        self.idx.clear(w)
        self.model[w].clear()

    @rule(w=st.sampled_from(WORKERS), c=prompts)
    def speculative(self, w, c):
        self.seen.append(c)
        self.idx.insert_speculative(w, c)
        m = self.model[w]
        for h in c:
            if m.get(h) != math.inf:
                m[h] = self.clock.t + TTL

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]))
    def advance(self, dt):
        self.clock.t += dt

    @rule(c=prompts)
    def match(self, c):
        self.check_match(c)

    def check_match(self, c):
        want = {}
        for w in WORKERS:
            live, n = self.live(w), 0
            while n < len(c) and c[n] in live:
                n += 1
            if n:
                want[w] = n
        assert self.idx.match(c) == want

    @invariant()
    def same_as_model(self):
        live = {w: self.live(w) for w in WORKERS}
        assert len(self.idx) == len(set().union(*live.values()))
        assert self.idx.workers() == {w for w in WORKERS if live[w]}
        for w in WORKERS:
            assert self.idx.num_pages(w) == len(live[w])
            assert self.idx.snapshot(w) == {h for h, d in live[w].items() if d == math.inf}
        assert all(d > self.clock.t for d, _, _ in self.idx._expiry), "expired item kept"
        self.idx.check_integrity()
        for c in self.seen[-3:]:
            self.check_match(c)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- policies ----

def cands(*specs) -> list[Candidate]:
    """Candidates w0, w1, ... from (load, overlap) pairs."""
    return [Candidate(f"w{i}", load, overlap) for i, (load, overlap) in enumerate(specs)]


def test_registry():
    assert policy_names() == sorted(
        ["cache_aware", "least_load", "power_of_two", "round_robin", "random"])
    assert make_policy().name == "cache_aware"
    for name in policy_names():
        p = make_policy(name)
        assert isinstance(p, Policy) and p.name == name
        with pytest.raises(ValueError):
            p.choose([], 10)
        only = Candidate("solo", 5.0)
        assert p.choose([only], 10) is only
    with pytest.raises(ValueError, match="unknown routing policy 'nope'.*cache_aware.*round_robin"):
        make_policy("nope")
    with pytest.raises(ValueError, match="twice"):
        register_policy("random")(type("Again", (Policy,), {}))
    with pytest.raises(ValueError):
        make_policy("cache_aware", cache_weight=-1)


def test_cache_aware_prefers_overlap_weighed_against_load():
    p = make_policy("cache_aware")
    c = cands((100, 0), (300, 512), (50, 0))
    assert p.choose(c, 1000).worker == "w1"            # 512 - 300 beats -50
    assert p.choose(cands((100, 0), (700, 512)), 1000).worker == "w0"   # -100 beats -188
    heavy = make_policy("cache_aware", cache_weight=2.0)
    assert heavy.choose(cands((100, 0), (700, 512)), 1000).worker == "w1"
    assert make_policy("cache_aware", cache_weight=0).choose(c, 1000).worker == "w2"


def test_cache_aware_ties_break_to_less_load_then_worker_id():
    p = make_policy("cache_aware")
    c = cands((100, 100), (0, 0), (300, 300))           # all score 0
    assert p.choose(c, 500).worker == "w1"
    assert p.choose(c[::-1], 500).worker == "w1"
    same = [Candidate("b", 10, 5), Candidate("a", 10, 5), Candidate("c", 10, 5)]
    assert p.choose(same, 500).worker == "a" and p.choose(same[::-1], 500).worker == "a"


def test_cache_aware_balance_guard():
    p = make_policy("cache_aware", balance_abs_threshold=64, balance_rel_threshold=1.5)
    # imbalanced (diff 900 > 64, 1000 > 1.5 x 100): the cache is ignored
    assert p.choose(cands((1000, 4000), (100, 0), (200, 0)), 5000).worker == "w1"
    # among equally loaded ones, the most cached wins
    assert p.choose(cands((1000, 4000), (100, 0), (100, 64)), 5000).worker == "w2"
    # diff over the absolute threshold but within 1.5x: the score decides
    assert p.choose(cands((1100, 4000), (800, 0)), 5000).worker == "w0"
    # ratio over 1.5x but diff within 64: the score decides
    assert p.choose(cands((60, 4000), (0, 0)), 5000).worker == "w0"
    # the defaults leave a few thousand tokens of imbalance to the score
    assert make_policy("cache_aware").choose(cands((3000, 4000), (0, 0)), 5000).worker == "w0"
    assert make_policy("cache_aware").choose(cands((5000, 8000), (0, 0)), 9000).worker == "w1"


def test_least_load():
    p = make_policy("least_load")
    assert p.choose(cands((5, 0), (2, 0), (9, 100)), 10).worker == "w1"
    assert p.choose(cands((2, 0), (2, 8), (2, 8)), 10).worker == "w1"   # most cached, then id


def test_round_robin_cycles_in_worker_order():
    p = make_policy("round_robin")
    c = cands((0, 0), (50, 0), (9, 9))
    assert [p.choose(c, 1).worker for _ in range(7)] == ["w0", "w1", "w2"] * 2 + ["w0"]
    assert p.choose(c[::-1], 1).worker == "w1"           # the counter, not the list order
    q = make_policy("round_robin")                       # one counter per instance
    assert q.choose(c, 1).worker == "w0"


def test_power_of_two_never_picks_the_most_loaded():
    p = make_policy("power_of_two", seed=0)
    c = cands((10, 0), (20, 0), (30, 0), (40, 0))
    picks = Counter(p.choose(c, 1).worker for _ in range(400))
    assert "w3" not in picks and picks["w0"] > picks["w1"] > picks["w2"] > 0
    for seed in range(20):                                # of two, always the less loaded
        assert make_policy("power_of_two", seed=seed).choose(cands((7, 0), (3, 0)), 1).worker == "w1"


@pytest.mark.parametrize("name", ["power_of_two", "random"])
def test_seeds_reproduce(name):
    c = cands(*[(i % 3, 0) for i in range(8)])
    a, b = make_policy(name, seed=7), make_policy(name, seed=7)
    seq_a = [a.choose(c, 1).worker for _ in range(50)]
    assert seq_a == [b.choose(c[::-1], 1).worker for _ in range(50)]   # list order irrelevant
    other = make_policy(name, seed=8)
    assert seq_a != [other.choose(c, 1).worker for _ in range(50)]


def test_random_covers_every_worker():
    p = make_policy("random", seed=3)
    c = cands((0, 0), (100, 0), (5, 5))
    assert {p.choose(c, 1).worker for _ in range(100)} == {"w0", "w1", "w2"}


# ---- imports ----

def test_gateway_modules_do_not_import_torch():
    code = ("import sys, services.gateway.index, services.gateway.policies; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m.startswith(('services.engine', 'kernels'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"
