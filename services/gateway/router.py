"""Picks the workers of one request: a prefill worker by the global index, a
decode worker by load and its own cached prefix (DESIGN.md sections 2-3).

Loads are the gateway's own counters (what it routed and has not seen finish),
in tokens: a prefill worker's uncached prompt tokens in flight; a decode
worker's open streams weigh DECODE_STREAM_TOKENS each. With no prefill-role
worker for the model, the decode worker (role both) prefills locally.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.common.page_hash import hash_pages

from .index import GlobalIndex
from .policies import Candidate, make_policy
from .types import ApiError
from .workers import WorkerState

DECODE_STREAM_TOKENS = 32


@dataclass
class Route:
    prefill: WorkerState | None          # None: the decode worker prefills locally
    decode: WorkerState
    prefill_load: int                    # uncached tokens charged to the prefilling worker
    overlap: int                         # tokens the prefilling worker holds (per the index)

    def charge(self) -> None:
        (self.prefill or self.decode).prefill_tokens += self.prefill_load
        self.decode.running += 1

    def prefill_done(self) -> None:
        if self.prefill_load:
            (self.prefill or self.decode).prefill_tokens -= self.prefill_load
            self.prefill_load = 0

    def finish(self) -> None:
        self.prefill_done()
        self.decode.running -= 1


class Router:
    def __init__(self, index: GlobalIndex, policy: str = "cache_aware", **policy_kwargs):
        self.index = index
        self.policy_name = policy
        self._prefill_policy = make_policy(policy, **policy_kwargs)
        self._decode_policy = make_policy(policy, **policy_kwargs)

    def route(self, workers: list[WorkerState], model: str, prompt_ids: list[int],
              exclude: frozenset[str] = frozenset()) -> Route:
        live = [w for w in workers if w.healthy and w.model == model and w.address not in exclude]
        prefillers = [w for w in live if w.role == "prefill"]
        decoders = [w for w in live if w.can_decode]
        if not decoders:
            raise ApiError(503, f"no decode worker of model {model!r} is ready", retry_after=1)
        ps = decoders[0].page_size
        hashes = hash_pages(prompt_ids, ps)
        held = self.index.match(hashes) if hashes else {}
        n = len(prompt_ids)

        def overlap(w: WorkerState) -> int:
            return min(held.get(w.address, 0) * w.page_size, n - 1)

        prefill = None
        if prefillers:
            c = self._prefill_policy.choose(
                [Candidate(w.address, w.prefill_tokens, overlap(w)) for w in prefillers], n)
            prefill = next(w for w in prefillers if w.address == c.worker)
        c = self._decode_policy.choose(
            [Candidate(w.address, w.running * DECODE_STREAM_TOKENS + w.prefill_tokens, overlap(w))
             for w in decoders], n)
        decode = next(w for w in decoders if w.address == c.worker)
        cached = overlap(prefill or decode)
        if hashes:
            for addr in {w.address for w in (prefill, decode) if w is not None}:
                self.index.insert_speculative(addr, hashes)
        return Route(prefill, decode, n - cached, cached)
