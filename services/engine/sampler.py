"""Batched sampling on the logits' device.

One decode step, each stage skipped unless some row of the batch uses it:

    raw logits --> log_softmax --> logprobs, top_logprobs      (rows that asked)
         |
         +--> repetition / frequency / presence penalties
              --> min_new_tokens ban --+--> argmax              (greedy rows)
                                       +--> / temperature --> top-k --> top-p
                                            --> min-p --> exponential race  (sampled rows)

Semantics:
- Logprobs are those of the raw model logits (vLLM's default): before
  penalties, bans and temperature. They describe the model, not the sampler.
- Repetition penalty follows HF over prompt + output tokens (positive logits
  divided, negative multiplied); frequency and presence penalties follow
  OpenAI over output tokens only (count * frequency + presence subtracted).
- While len(output_ids) < min_new_tokens, stop_token_ids and the eos ids are
  banned; with ignore_eos the eos ids are ordinary tokens and stay allowed,
  but stop_token_ids are still banned (the user asked for both).
- Greedy rows (temperature ~0 or top_k 1) take argmax of the penalized logits.
- Sampled rows draw argmax(probs / E) with E ~ Exp(1) i.i.d. per token, which
  samples exactly from probs without a per-row multinomial sync.
- A seeded row's noise comes from a generator seeded by (seed, step), step =
  len(output_ids): its tokens never depend on the rest of the batch or on its
  row index. Unseeded rows share the Sampler's generator (the engine's seed).
- Top-k and top-p cut at a per-row logit threshold; tokens tied with it stay
  (the support may exceed k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from services.engine.sampling_params import SamplingParams

_MASK64 = 2**64 - 1


@dataclass
class SamplingInput:
    """What the sampler needs of one running request; built each step, cheap.
    The id sequences may be lists or numpy arrays (arrays make penalties cheap)."""
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    eos_token_ids: tuple[int, ...] = ()

    @property
    def step(self) -> int:
        return len(self.output_ids)

    def banned_ids(self) -> tuple[int, ...]:
        """Tokens masked this step because min_new_tokens is not reached yet."""
        if self.step >= self.params.min_new_tokens:
            return ()
        eos = () if self.params.ignore_eos else self.eos_token_ids
        return tuple(set(self.params.stop_token_ids) | set(eos))


@dataclass
class Penalties:
    # Token ids as flat indices row * V + id into a [B, V] tensor: no padding,
    # and built with one numpy concatenation (a Python pass over every id would
    # cost ~1 us per token, at B=256 with long prompts tens of milliseconds).
    output_index: Tensor           # [sum of output lengths] int64
    prompt_index: Tensor | None    # [sum of prompt lengths] int64; only when repetition is used
    repetition: Tensor | None      # [B] float32, 1.0 = off
    frequency: Tensor | None       # [B] float32, 0.0 = off
    presence: Tensor | None        # [B] float32, 0.0 = off


@dataclass
class SamplingBatch:
    """Per-row sampling tensors for one step. A tensor is None when no row uses
    its stage, so the common cases (all greedy, plain temperature) stay cheap."""
    size: int
    vocab_size: int
    device: torch.device
    all_greedy: bool
    greedy: Tensor | None          # [B] bool; None when all rows or no row is greedy
    temperatures: Tensor | None    # [B] float32; greedy rows hold 1.0
    top_k: Tensor | None           # [B] int64 in [1, V]; V = off
    top_width: int                 # how many of the largest logits top-k/top-p look at
    top_p: Tensor | None           # [B] float32; 1.0 = off
    min_p: Tensor | None           # [B] float32; 0.0 = off
    penalties: Penalties | None
    banned: tuple[Tensor, Tensor] | None   # (rows, token ids) set to -inf
    seeded_rows: list[tuple[int, int]]     # (row, 64-bit seed for this step), sampled rows only
    any_unseeded: bool             # some sampled row draws from the shared generator
    logprob_rows: list[int]        # rows that asked for logprobs
    top_logprobs: list[int]        # top_logprobs of each row in logprob_rows

    @classmethod
    def plain_greedy(cls, size: int, vocab_size: int, device: torch.device | str = "cpu") -> "SamplingBatch":
        """What build() makes of rows that are all greedy without penalties, logprobs
        or banned ids (Request.plain_greedy): argmax, nothing per row."""
        return cls(size=size, vocab_size=vocab_size, device=torch.device(device), all_greedy=True, greedy=None,
                   temperatures=None, top_k=None, top_width=vocab_size, top_p=None, min_p=None, penalties=None,
                   banned=None, seeded_rows=[], any_unseeded=False, logprob_rows=[], top_logprobs=[])

    @classmethod
    def build(cls, inputs: Sequence[SamplingInput], vocab_size: int,
              device: torch.device | str = "cpu",
              resolve: Callable[[Tensor], Tensor] | None = None) -> "SamplingBatch":
        """`resolve` maps placeholder output ids (< 0, tokens still on the device) to
        their values (overlap.FutureTokens.resolve); only penalties read output ids."""
        device = torch.device(device)
        params = [x.params for x in inputs]
        greedy = [p.greedy for p in params]
        n_greedy = sum(greedy)

        def per_row(get: Callable[[SamplingParams], float], neutral, dtype) -> Tensor | None:
            vals = [neutral if g else get(p) for p, g in zip(params, greedy)]
            if all(v == neutral for v in vals):
                return None
            return _to_device(vals, dtype, device)

        top_k = per_row(lambda p: _clamp_top_k(p.top_k, vocab_size), vocab_size, torch.int64)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs]
        return cls(
            size=len(inputs), vocab_size=vocab_size, device=device,
            all_greedy=n_greedy == len(inputs),
            greedy=_to_device(greedy, torch.bool, device) if 0 < n_greedy < len(inputs) else None,
            temperatures=per_row(lambda p: p.temperature, 1.0, torch.float32),
            top_k=top_k, top_width=_top_width(params, greedy, vocab_size),
            top_p=per_row(lambda p: p.top_p, 1.0, torch.float32),
            min_p=per_row(lambda p: p.min_p, 0.0, torch.float32),
            penalties=_build_penalties(inputs, vocab_size, device, resolve),
            banned=_build_banned(inputs, device),
            seeded_rows=[(i, step_seed(x.params.seed, x.step)) for i, (x, g) in enumerate(zip(inputs, greedy))
                         if not g and x.params.seed is not None],
            any_unseeded=any(not g and p.seed is None for p, g in zip(params, greedy)),
            logprob_rows=logprob_rows,
            top_logprobs=[params[i].top_logprobs for i in logprob_rows],
        )


@dataclass
class SampleOutput:
    token_ids: list[int]
    # Both None when no row asked for logprobs; else one entry per row, None
    # for rows that did not ask ([] in top_logprobs for rows with top_logprobs=0).
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


class PendingSample:
    """A step's sampled ids (and logprobs) on the device, their copy to the host queued
    behind them; `result()` waits for that copy only (not for later work on the stream)."""

    def __init__(self, tokens: Tensor, logits: Tensor, batch: SamplingBatch):
        self.tokens = tokens
        self._rows, self._top_logprobs = batch.logprob_rows, batch.top_logprobs
        self._size = batch.size
        dev = [tokens]
        if self._rows:
            rows = _to_device(self._rows, torch.int64, logits.device)
            lp = torch.log_softmax(logits[rows].float(), dim=-1)
            top = lp.topk(max(self._top_logprobs), dim=-1)
            dev += [lp.gather(1, tokens[rows][:, None]).squeeze(1), top.values, top.indices]
        cuda = tokens.device.type == "cuda"
        self._host = [t.to("cpu", non_blocking=cuda) for t in dev]
        self._event = torch.cuda.Event() if cuda else None
        if cuda:
            self._event.record()

    def result(self) -> SampleOutput:
        if self._event is not None:
            self._event.synchronize()
        host = [h.tolist() for h in self._host]
        if not self._rows:
            return SampleOutput(token_ids=host[0])
        token_ids, chosen, top_vals, top_ids = host
        out = SampleOutput(token_ids, [None] * self._size, [None] * self._size)
        for j, (row, k) in enumerate(zip(self._rows, self._top_logprobs)):
            out.logprobs[row] = chosen[j]
            out.top_logprobs[row] = list(zip(top_ids[j][:k], top_vals[j][:k]))
        return out


class Sampler:
    """Picks one token per row. Holds the engine-wide generator for unseeded rows
    (one per device, seeded with `seed`) and a scratch generator that seeded rows
    re-seed from (seed, step)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SampleOutput:
        return self.sample(logits, batch).result()

    def sample(self, logits: Tensor, batch: SamplingBatch) -> PendingSample:
        """Sample without waiting for the host: the ids stay on the device (`tokens`)."""
        if logits.shape != (batch.size, batch.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} != batch "
                             f"({batch.size}, {batch.vocab_size})")
        x = adjust_logits(logits, batch)
        tokens = x.argmax(-1) if batch.all_greedy else self._sample(x, batch)
        if batch.greedy is not None:
            tokens = torch.where(batch.greedy, x.argmax(-1), tokens)
        return PendingSample(tokens, logits, batch)

    def _sample(self, x: Tensor, batch: SamplingBatch) -> Tensor:
        x = x.float()
        if batch.temperatures is not None:
            x = x / batch.temperatures[:, None]
        if batch.top_k is not None or batch.top_p is not None:
            x = apply_top_k_top_p(x, batch.top_k, batch.top_p, batch.top_width)
        probs = x.softmax(-1)
        if batch.min_p is not None:
            probs = apply_min_p(probs, batch.min_p)
        return probs.div_(self._noise(probs, batch)).argmax(-1)

    def _noise(self, probs: Tensor, batch: SamplingBatch) -> Tensor:
        """Exp(1) noise, [B, V]; seeded rows from their own (seed, step) stream."""
        q = torch.empty_like(probs)
        if batch.any_unseeded:
            q.exponential_(generator=self._generator(self._shared, probs.device, self.seed))
        else:
            q.fill_(1.0)
        if batch.seeded_rows:
            g = self._generator(self._scratch, probs.device, 0)
            for row, seed in batch.seeded_rows:
                q[row].exponential_(generator=g.manual_seed(seed))
        return q.clamp_min_(torch.finfo(q.dtype).tiny)   # never divide by 0

    @staticmethod
    def _generator(cache: dict, device: torch.device, seed: int) -> torch.Generator:
        if device not in cache:
            cache[device] = torch.Generator(device=device).manual_seed(seed)
        return cache[device]


# --- stages (pure functions of tensors; each returns a new tensor) ---------

def adjust_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Penalties and min_new_tokens bans, in float32. Returns `logits` itself
    (any dtype, unmodified) when no row uses either."""
    if batch.penalties is None and batch.banned is None:
        return logits
    x = logits.to(torch.float32, copy=True)
    if batch.penalties is not None:
        x = apply_penalties(x, batch.penalties)
    if batch.banned is not None:
        x[batch.banned] = float("-inf")             # a scalar: no host-to-device copy
    return x


def apply_penalties(x: Tensor, pen: Penalties) -> Tensor:
    counts = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    counts = counts.index_add_(0, pen.output_index, torch.ones_like(pen.output_index, dtype=x.dtype))
    counts = counts.view(x.shape)
    if pen.repetition is not None:
        seen = counts > 0
        if pen.prompt_index is not None:
            in_prompt = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
            seen |= in_prompt.index_fill_(0, pen.prompt_index, True).view(x.shape)
        r = pen.repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if pen.frequency is not None:
        x = x - pen.frequency[:, None] * counts
    if pen.presence is not None:
        x = x - pen.presence[:, None] * (counts > 0)
    return x


def apply_top_k_top_p(x: Tensor, k: Tensor | None, p: Tensor | None, width: int) -> Tensor:
    """Top-k, then top-p over what is left (the smallest prefix of tokens whose
    mass reaches p; the top token always stays). Both only look at each row's
    `width` largest logits: a topk, not a full sort, when every top-p row also
    has a top-k. The result is a per-row logit threshold; ties with it stay."""
    B, V = x.shape
    vals = x.topk(width, dim=-1).values if width < V else x.sort(dim=-1, descending=True).values
    k = k if k is not None else torch.full((B,), V, device=x.device)
    n = k.clamp(max=width)                       # tokens kept per row
    off = k >= V
    if p is not None:
        rank = torch.arange(width, device=x.device)
        probs = vals.masked_fill(rank >= n[:, None], float("-inf")).softmax(-1)
        nucleus = (probs.cumsum(-1) - probs < p[:, None]) & (rank < n[:, None])
        n = torch.where(p < 1, nucleus.sum(-1), n)
        off = off & (p >= 1)
    thresh = vals.gather(1, (n - 1)[:, None]).masked_fill(off[:, None], float("-inf"))
    return x.masked_fill(x < thresh, float("-inf"))


def apply_min_p(probs: Tensor, min_p: Tensor) -> Tensor:
    """Zero tokens whose probability is below min_p * (the row's top probability)."""
    thresh = min_p[:, None] * probs.amax(-1, keepdim=True)
    return probs.masked_fill(probs < thresh, 0.0)


# --- helpers ------------------------------------------------------------------

def step_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from (request seed, step); splitmix64 twice, so
    nearby seeds and steps give unrelated streams."""
    return _splitmix64(_splitmix64(seed) ^ step)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _clamp_top_k(top_k: int, vocab_size: int) -> int:
    return min(top_k, vocab_size) if top_k > 0 else vocab_size


def _top_width(params: list[SamplingParams], greedy: list[bool], V: int) -> int:
    """Largest k among sampled rows, or V when a top-p row has no top-k."""
    sampled = [p for p, g in zip(params, greedy) if not g]
    ks = [_clamp_top_k(p.top_k, V) for p in sampled]
    if any(k >= V and p.top_p < 1 for k, p in zip(ks, sampled)):
        return V
    return max((k for k in ks if k < V), default=V)


def _to_device(vals, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list on the device without a host sync (pinned, non-blocking on CUDA)."""
    t = vals if isinstance(vals, Tensor) else torch.tensor(vals, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _flat_index(rows: list[Sequence[int]], V: int, device: torch.device,
                resolve: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Ids of each row as indices into a flattened [B, V] tensor; placeholder ids (< 0)
    go through `resolve` on the device."""
    ids = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(r, dtype=np.int64) for r in rows])
    offsets = np.repeat(np.arange(len(rows), dtype=np.int64) * V, [len(r) for r in rows])
    if resolve is None or not (ids < 0).any():
        return _to_device(torch.from_numpy(ids + offsets), torch.int64, device)
    return resolve(_to_device(torch.from_numpy(ids), torch.int64, device)) + \
        _to_device(torch.from_numpy(offsets), torch.int64, device)


def _build_penalties(inputs: Sequence[SamplingInput], V: int, device, resolve=None) -> Penalties | None:
    params = [x.params for x in inputs]
    if not any(p.uses_penalties for p in params):
        return None

    def row_values(get, neutral) -> Tensor | None:
        vals = [get(p) for p in params]
        if all(v == neutral for v in vals):
            return None
        return _to_device(vals, torch.float32, device)

    rep = row_values(lambda p: p.repetition_penalty, 1.0)
    outputs = [x.output_ids if x.params.uses_penalties else () for x in inputs]
    prompts = [x.prompt_ids if x.params.repetition_penalty != 1.0 else () for x in inputs]
    return Penalties(
        output_index=_flat_index(outputs, V, device, resolve),
        prompt_index=_flat_index(prompts, V, device) if rep is not None else None,
        repetition=rep,
        frequency=row_values(lambda p: p.frequency_penalty, 0.0),
        presence=row_values(lambda p: p.presence_penalty, 0.0),
    )


def _build_banned(inputs: Sequence[SamplingInput], device) -> tuple[Tensor, Tensor] | None:
    rows, cols = [], []
    for i, x in enumerate(inputs):
        ids = x.banned_ids()
        rows += [i] * len(ids)
        cols += ids
    if not rows:
        return None
    return _to_device(rows, torch.int64, device), _to_device(cols, torch.int64, device)
