"""Running steps, with or without overlapping the host and the device.

Without overlap, `collect()` hands back the step just run: its ids are read
back (a host sync) before the engine postprocesses it and schedules the next.

With overlap (CUDA; the idea of SGLang's overlap scheduler), the host runs one
step ahead of what it has read back:

    host:   schedule N+1 | launch N+1 | read ids of N, postprocess N | schedule N+2 ...
    device:     ... forward + sample N    | forward + sample N+1       | ...

Step N's sampled ids stay on the device in FutureTokens; a request that
continues gets a placeholder -(slot + 1) as its newest token, and step N+1's
runner swaps it for the device value (`resolve`, a gather). The copy of N's ids
to the host is queued behind N and waited for after N+1 is launched, so the
device never waits on the scheduler, the page-table upload or postprocessing.

The engine keeps the bookkeeping straight (engine.py): a request's state is
advanced at launch (num_computed, a placeholder token), the placeholder is
replaced when its step is collected, a request that finished at step N but was
already launched in N+1 has that extra token dropped, and a request that is
certain to finish by length is not scheduled again (Request.reached_max_len).
Every device write is stream-ordered, so pages or page-table rows freed while
step N+1 is in flight are only reused by later steps.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .sampler import PendingSample, Sampler, SamplingBatch
from .scheduler import ScheduledBatch


class FutureTokens:
    """A device ring of sampled ids, read by the next step through placeholders."""

    def __init__(self, device: torch.device, size: int = 1024):
        self.device = device
        self.buf = torch.zeros(size, dtype=torch.int32, device=device)
        self._next = 0

    def put(self, tokens: torch.Tensor) -> list[int]:
        """Store a step's ids; their placeholders. A slot is reused at the earliest two
        steps later: its readers (the next step) are launched before that write."""
        n = tokens.shape[0]
        if 2 * n > self.buf.shape[0]:
            old, self.buf = self.buf, torch.zeros(4 * n, dtype=torch.int32, device=self.device)
            self.buf[:old.shape[0]] = old
        if self._next + n > self.buf.shape[0]:
            self._next = 0
        start, self._next = self._next, self._next + n
        self.buf[start:start + n] = tokens
        return list(range(-start - 1, -start - n - 1, -1))

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        """ids with every placeholder replaced by its token (same dtype and shape)."""
        slot = (-1 - ids).clamp_min(0).long()
        return torch.where(ids < 0, self.buf[slot].to(ids.dtype), ids)


@dataclass
class LaunchedStep:
    batch: ScheduledBatch
    sample: PendingSample | None        # None: no chunk of the batch samples

    def result(self):
        return self.sample.result() if self.sample is not None else None


class StepExecutor:
    """Runs a scheduled batch (forward, then sampling) and hands steps back for
    postprocessing: the same step (overlap off) or the one before it (overlap on)."""

    def __init__(self, runner, sampler: Sampler, overlap: bool):
        self.runner, self.sampler = runner, sampler
        self.overlap = overlap
        self._launched: deque[LaunchedStep] = deque()
        self._fresh = False

    def run(self, batch: ScheduledBatch, sampling: SamplingBatch | None) -> list[int]:
        """Launch a step; the placeholder id of each sampling chunk's new token."""
        logits = self.runner.run(batch)
        sample = self.sampler.sample(logits, sampling) if sampling is not None else None
        self._launched.append(LaunchedStep(batch, sample))
        self._fresh = True
        if sample is None:
            return []
        if self.overlap:
            return self.runner.futures.put(sample.tokens)
        return [-1] * sampling.size                 # collected before anything reads them

    def collect(self) -> LaunchedStep | None:
        """The step to postprocess now, if any: with overlap, the one launched before the
        latest (or the last one, once no new step was launched)."""
        keep = 1 if self.overlap and self._fresh else 0
        self._fresh = False
        return self._launched.popleft() if len(self._launched) > keep else None

    @property
    def busy(self) -> bool:
        return bool(self._launched)

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        return self.runner.futures.resolve(ids)
