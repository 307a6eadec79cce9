"""Routing policies: pick one worker of a pool for a request.

The caller builds one Candidate per healthy worker of the pool: its load (in
flight work, as the caller measures it: prompt tokens not yet prefilled for a
prefill worker, running requests for a decode worker) and the request's
overlap with it (cached prefix in tokens, from GlobalIndex.match() x
page_size). A policy only chooses; it never mutates candidates, so the caller
adds the request to the winner's load itself.

Policies live in a registry by name (the gateway's `--policy` flag):

    policy = make_policy("cache_aware", cache_weight=2.0)
    best = policy.choose(candidates, prompt_len)

Stable tie-breaks use the worker id, so that the choice does not depend on the
order of the candidate list. Random policies take a `seed` for reproducible
runs. Not thread-safe (round_robin and the random ones keep state).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_POLICY = "cache_aware"


@dataclass(frozen=True)
class Candidate:
    worker: str          # worker id, e.g. "127.0.0.1:50061"
    load: float          # in-flight work: tokens (prefill) or running requests (decode)
    overlap: int = 0     # cached prefix of this request on this worker, in tokens


class Policy:
    """Base class: subclasses set `name` (through register_policy) and choose()."""
    name = ""

    def choose(self, candidates: Sequence[Candidate], prompt_len: int) -> Candidate:
        raise NotImplementedError

    @staticmethod
    def _check(candidates: Sequence[Candidate]) -> None:
        if not candidates:
            raise ValueError("no candidate worker to choose from")


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make a Policy subclass available to make_policy(name)."""
    def deco(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY:
            raise ValueError(f"routing policy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def make_policy(name: str = DEFAULT_POLICY, **kwargs) -> Policy:
    """A new instance of the policy registered as `name`, built with kwargs."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(policy_names())}")
    return cls(**kwargs)


def policy_names() -> list[str]:
    """Names of the registered policies, sorted."""
    return sorted(_REGISTRY)


def _by_id(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates sorted by worker id: a seed gives the same draws whatever the list order."""
    return sorted(candidates, key=lambda c: c.worker)


def _by_load(c: Candidate) -> tuple:
    """Least loaded first, then the most cached, then the worker id."""
    return (c.load, -c.overlap, c.worker)


@register_policy("cache_aware")
class CacheAware(Policy):
    """Best score = overlap x cache_weight - load (DESIGN.md section 3); ties go
    to the less loaded worker, then the lower worker id.

    Balance guard (as sglang-router's): when the pool is imbalanced, i.e.
    max load - min load > balance_abs_threshold AND max load >
    balance_rel_threshold x min load, the cache is ignored and the least
    loaded worker wins (among equally loaded ones, the most cached).

    Defaults assume loads in tokens, the unit of overlap: cache_weight 1.0
    (a cached token saves about one token of prefill), balance_abs_threshold
    4096 tokens (a few prefill chunks: smaller gaps are the score's to weigh)
    and balance_rel_threshold 1.5. For loads in running requests (decode
    pools), scale cache_weight to requests per token and set
    balance_abs_threshold in requests (sglang-router uses 64 there).
    """

    def __init__(self, cache_weight: float = 1.0, balance_abs_threshold: float = 4096.0,
                 balance_rel_threshold: float = 1.5):
        if cache_weight < 0 or balance_abs_threshold < 0 or balance_rel_threshold < 1:
            raise ValueError("cache_aware needs cache_weight >= 0, balance_abs_threshold >= 0 "
                             "and balance_rel_threshold >= 1")
        self.cache_weight = cache_weight
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def imbalanced(self, candidates: Sequence[Candidate]) -> bool:
        lo = min(c.load for c in candidates)
        hi = max(c.load for c in candidates)
        return hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo

    def choose(self, candidates: Sequence[Candidate], prompt_len: int) -> Candidate:
        self._check(candidates)
        if self.imbalanced(candidates):
            return min(candidates, key=_by_load)
        w = self.cache_weight
        return min(candidates, key=lambda c: (c.load - c.overlap * w, c.load, c.worker))


@register_policy("least_load")
class LeastLoad(Policy):
    """The least loaded worker; ties go to the most cached, then the lower id."""

    def choose(self, candidates: Sequence[Candidate], prompt_len: int) -> Candidate:
        self._check(candidates)
        return min(candidates, key=_by_load)


@register_policy("power_of_two")
class PowerOfTwo(Policy):
    """Two distinct workers drawn at random; the less loaded of them (ties as
    least_load). Near least_load's balance without herding on stale loads."""

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[Candidate], prompt_len: int) -> Candidate:
        self._check(candidates)
        if len(candidates) == 1:
            return candidates[0]
        return min(self._rng.sample(_by_id(candidates), 2), key=_by_load)


@register_policy("round_robin")
class RoundRobin(Policy):
    """Workers in turn (sorted by id), one counter per policy instance."""

    def __init__(self):
        self._next = 0

    def choose(self, candidates: Sequence[Candidate], prompt_len: int) -> Candidate:
        self._check(candidates)
        ordered = _by_id(candidates)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return chosen


@register_policy("random")
class Random(Policy):
    """A worker drawn uniformly at random."""

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[Candidate], prompt_len: int) -> Candidate:
        self._check(candidates)
        return self._rng.choice(_by_id(candidates))
