"""A request's state inside the engine (plain data; no tensors)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    # KV state. pages[i] holds positions [i*ps, (i+1)*ps). The first
    # `cached_len` tokens' pages belong to the radix cache (locked via
    # `cache_node`); the rest are the request's own.
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0          # positions whose KV is in the pool
    cached_len: int = 0            # prefix owned by the radix cache
    cache_node: Any = None
    num_cached_prompt: int = 0     # prompt tokens served from cache at (first) admission
    num_retractions: int = 0
    # Prefill role: when the request finishes, copy out the KV of prompt
    # positions [export_kv_from, len(prompt_ids)) for a decode worker.
    export_kv_from: int | None = None
    # Length at which it finishes ("length"): prompt + max_new_tokens, capped by the context.
    max_seq_len: int = 2**62
    # Paged runners: the request's row of the device page table (page_table.py) and how many
    # of `pages` that row holds. KVManager zeroes page_table_synced when it replaces pages.
    page_table_row: int = -1
    page_table_synced: int = 0
    # Greedy, without penalties, logprobs or a min_new_tokens ban: a batch of only these
    # samples by argmax with nothing to build (SamplingBatch.plain_greedy).
    plain_greedy: bool = field(init=False, default=False)

    def __post_init__(self):
        p = self.params
        self.plain_greedy = p.greedy and not p.uses_penalties and not p.logprobs and p.min_new_tokens == 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens that still need a forward before the next sample."""
        return self.seq_len - self.num_computed

    @property
    def reached_max_len(self) -> bool:
        """Its newest token (sampled, perhaps not yet read back) ends it by length."""
        return self.seq_len >= self.max_seq_len

    @property
    def is_decoding(self) -> bool:
        return self.num_pending == 1 and bool(self.output_ids)
