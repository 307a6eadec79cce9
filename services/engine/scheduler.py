"""Continuous batching with chunked prefill; emits plain data, never tensors.

Each step gets one token budget (chunked_prefill_size). Decoding requests
go first, one token each; what remains of the budget goes to prefill chunks
of running requests, then to newly admitted ones. When the pool cannot hold
the next decode tokens, the newest running request is retracted: its KV is
handed to the prefix cache, it keeps its generated tokens and waits again at
the head of the queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from .config import SchedulerConfig
from .kv_manager import KVManager
from .request import Request, Status


class Chunk(NamedTuple):     # a tuple: hundreds are made every step
    req: Request
    start: int          # first position computed in this forward
    n: int              # number of positions computed
    sample: bool        # reaches the end of the sequence: sample the next token


@dataclass(frozen=True)
class ScheduledBatch:
    chunks: tuple[Chunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.n for c in self.chunks)


POLICIES = ("fcfs", "lpm")
LPM_MAX_QUEUE = 128      # past this many waiting requests, prefix matching costs more than it wins


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVManager):
        if cfg.schedule_policy not in POLICIES:
            raise ValueError(f"policy {cfg.schedule_policy!r} is unknown (known: {POLICIES})")
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_retractions = 0

    # -- queue ---------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose prompt KV is already in its pages (prefilled elsewhere)."""
        req.status = Status.RUNNING
        self.running.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request, keep: bool) -> None:
        """Take a finished or aborted request out; free its pages."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.kv.release(req, keep=keep)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED

    # -- one step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        chunks = self._schedule_decodes()
        chunks += self._schedule_prefills(self.cfg.chunked_prefill_size - len(chunks))
        return ScheduledBatch(tuple(chunks)) if chunks else None

    def _schedule_decodes(self) -> list[Chunk]:
        # One pass over the running requests with their fields read inline (this runs
        # every step for hundreds of requests): r.is_decoding and not r.reached_max_len,
        # that is one position pending after a first output, and the newest token (maybe
        # not read back yet) does not end it by length.
        ps = self.kv.ps
        decodes, need = [], 0
        for r in self.running:
            n_out = len(r.output_ids)
            seq = len(r.prompt_ids) + n_out
            if n_out and seq - r.num_computed == 1 and seq < r.max_seq_len:
                decodes.append(r)
                k = -(-seq // ps) - len(r.pages)      # pages_needed(r, num_computed + 1)
                if k > 0:
                    need += k
        while need > self.kv.available_pages() and len(self.running) > 1:
            victim = self.running[-1]
            if victim in decodes:
                decodes.remove(victim)
                need -= self.kv.pages_needed(victim, victim.num_computed + 1)
            self._retract(victim)
        chunks = []
        for r in decodes:
            start = r.num_computed
            if -(-(start + 1) // ps) > len(r.pages):
                ok = self.kv.ensure_pages(r, start + 1)
                assert ok, "decode page allocation failed after retraction"
            chunks.append(Chunk(r, start, 1, True))
        return chunks

    def _schedule_prefills(self, budget: int) -> list[Chunk]:
        chunks: list[Chunk] = []
        # One pass: the running requests still prefilling, and how many places are taken.
        # Requests done by length (their last token not read back yet, overlap.py) leave at
        # this step's postprocess: their places are free already.
        prefilling, active = [], 0
        for r in self.running:
            n_out = len(r.output_ids)
            seq = len(r.prompt_ids) + n_out
            active += seq < r.max_seq_len
            if not (n_out and seq - r.num_computed == 1):
                prefilling.append(r)
        for r in prefilling:
            if budget <= 0:
                return chunks
            c = self._chunk(r, budget)
            if c is None:
                return chunks
            chunks.append(c)
            budget -= c.n
        if not self.waiting:
            return chunks
        order = self._admission_order()              # (lpm: its prefix matches also keep the
        if budget <= 0 or active >= self.cfg.max_running_requests:   # waiting prompts fresh in the LRU)
            return chunks
        owed = self.running_reserve()                # kept up to date below, not recomputed
        for r in order:
            if budget <= 0 or active >= self.cfg.max_running_requests:
                break
            if prefilling and self._shares_pending_prefix(r, prefilling):
                continue
            c = self._admit(r, budget, owed)
            if c is None:
                break
            chunks.append(c)
            budget -= c.n
            active += 1
            owed += self.kv.pages_needed(r, r.seq_len + self._reserve(r))
            if not r.is_decoding:
                prefilling.append(r)
        return chunks

    def _shares_pending_prefix(self, r: Request, prefilling: list[Request]) -> bool:
        """Wait a step when most of r's uncached prompt is a prefix still being
        prefilled by another request: once that is cached, r reuses it instead of
        computing it a second time (a burst of prompts with one long system prompt)."""
        if self.kv.cache is None:
            return False
        ids = r.all_ids
        cached = self.kv.prefix_len(ids)
        for other in prefilling:
            lcp = _common_prefix_len(ids, other.all_ids)
            if lcp >= 2 * self.kv.ps and lcp - cached > (len(ids) - cached) // 2:
                return True
        return False

    def _chunk(self, r: Request, budget: int) -> Chunk | None:
        n = min(r.num_pending, budget)
        if not self.kv.ensure_pages(r, r.num_computed + n):
            return None
        return Chunk(r, r.num_computed, n, n == r.num_pending)

    def _admit(self, r: Request, budget: int, owed: int) -> Chunk | None:
        """`owed`: running_reserve() of the requests running now."""
        self.kv.admit(r)
        # Alone, a request only needs its sequence (the context cap makes that fit);
        # beside others it must also leave room for a share of its future tokens.
        future = self._reserve(r) if self.running else 1
        if self.kv.pages_needed(r, r.seq_len + future) > self.kv.available_pages() - owed:
            self.kv.release(r, keep=False)
            return None
        c = self._chunk(r, budget)
        if c is None:
            self.kv.release(r, keep=False)
            return None
        if r.num_retractions == 0:
            r.num_cached_prompt = r.cached_len
        self.waiting.remove(r)
        r.status = Status.RUNNING
        self.running.append(r)
        return c

    def _reserve(self, r: Request) -> int:
        """Decode tokens set aside at admission (a share of what it may still generate)."""
        left = r.params.max_new_tokens - len(r.output_ids)
        return int(left * self.cfg.new_token_ratio)

    def running_reserve(self) -> int:
        """Pages the running requests are still owed: rest of the prompt plus their reserve
        (pages_needed(r, r.seq_len + self._reserve(r)) summed, inline)."""
        ps, ratio, total = self.kv.ps, self.cfg.new_token_ratio, 0
        for r in self.running:
            n_out = len(r.output_ids)
            k = -(-(len(r.prompt_ids) + n_out + int((r.params.max_new_tokens - n_out) * ratio)) // ps) \
                - len(r.pages)
            if k > 0:
                total += k
        return total

    def _admission_order(self) -> Iterable[Request]:
        waiting = list(self.waiting)
        if self.cfg.schedule_policy == "lpm" and 1 < len(waiting) <= LPM_MAX_QUEUE:
            # Retracted requests keep their place at the head; the rest go longest-prefix first.
            head = [r for r in waiting if r.num_retractions]
            rest = [r for r in waiting if not r.num_retractions]
            rest.sort(key=lambda r: -self.kv.prefix_len(r.all_ids))
            waiting = head + rest
        return waiting

    def _retract(self, r: Request) -> None:
        self.running.remove(r)
        self.kv.release(r, keep=True)
        r.status = Status.WAITING
        r.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(r)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n            # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
