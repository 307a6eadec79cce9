"""The engine: Engine.step() is schedule -> run -> postprocess.

Requests come in as token ids with SamplingParams; each step yields the new
tokens of every request that sampled. `generate` (batches) and `stream` (one
request) are thin loops over step() for offline use.

On CUDA the executor overlaps (overlap.py): run() launches step N and
postprocess() reads back step N-1, so outputs lag the launches by one step.
A request's state moves at launch (num_computed, a placeholder for the token
being sampled) and its token lands at postprocess.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .config import EngineConfig
from .overlap import LaunchedStep, StepExecutor
from .request import Request, Status
from .sampler import SamplingBatch, SamplingInput
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch
from .builder import EngineParts, build_engine_parts


@dataclass
class StepOutput:
    rid: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_prompt: int = 0
    kv: torch.Tensor | None = None      # prefill role: the exported KV (KVPool.gather layout)


@dataclass
class GenerateResult:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str | None
    text: str | None = None
    num_cached_prompt: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class EngineError(ValueError):
    """A request the engine refuses (bad prompt, bad parameters)."""


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig(), parts: EngineParts | None = None):
        self.config = config
        p = parts or build_engine_parts(config)
        self.model_config, self.tokenizer, self.device = p.model_config, p.tokenizer, p.device
        self.kv, self.scheduler, self.runner, self.sampler = p.kv, p.scheduler, p.runner, p.sampler
        self.context_len = p.context_len
        self.eos_token_ids = p.eos_token_ids
        self.executor = StepExecutor(self.runner, self.sampler, overlap=p.overlap)
        self._requests: dict[str, Request] = {}
        self._reserved: dict[str, Request] = {}     # decode role: waiting for their KV
        self._ids = itertools.count()
        self.last_batch: ScheduledBatch | None = None     # what the latest step scheduled

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    rid: str | None = None, export_kv_from: int | None = None) -> str:
        """Queue a request. With export_kv_from (prefill role), its last StepOutput
        carries the KV of prompt positions [export_kv_from, len(prompt_ids))."""
        req = self._new_request(prompt_ids, params, rid)
        if export_kv_from is not None:
            if not 0 <= export_kv_from < len(req.prompt_ids):
                raise EngineError(f"export_kv_from {export_kv_from} is outside the prompt "
                                  f"[0, {len(req.prompt_ids)})")
            req.export_kv_from = export_kv_from
        self._requests[req.rid] = req
        self.scheduler.add(req)
        return req.rid

    def _new_request(self, prompt_ids: Sequence[int], params: SamplingParams | None,
                     rid: str | None) -> Request:
        params = params or SamplingParams()
        params.validate(self.model_config.vocab_size)
        self._check_prompt(prompt_ids)
        rid = rid if rid is not None else f"req-{next(self._ids)}"
        if rid in self._requests or rid in self._reserved:
            raise EngineError(f"rid {rid!r} is already in use")
        req = Request(rid, list(prompt_ids), params, self.eos_token_ids)
        req.max_seq_len = min(len(req.prompt_ids) + params.max_new_tokens, self.context_len)
        return req

    # -- decode role: a prompt prefilled elsewhere ---------------------------------------------
    # reserve() -> write_kv()* -> activate() (or abort()). Between reserve and activate the
    # request holds its pages but is not scheduled; only write_kv touches them.
    def reserve(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                rid: str | None = None) -> tuple[str, int] | None:
        """Pages for a whole prompt, reusing the cached prefix: (rid, cached tokens), the
        positions whose KV is already here. None (nothing held) when memory lacks."""
        req = self._new_request(prompt_ids, params, rid)
        self.kv.admit(req)
        n = len(req.prompt_ids)
        if self.kv.pages_needed(req, n + 1) > self.kv.available_pages() - self.scheduler.running_reserve() \
                or not self.kv.ensure_pages(req, n):
            self.kv.release(req, keep=False)
            return None
        self._reserved[req.rid] = req
        return req.rid, req.cached_len

    def write_kv(self, rid: str, start: int, kv: torch.Tensor) -> None:
        """KV (KVPool.gather layout) of prompt positions [start, start + len(kv))."""
        req = self._reserved[rid]
        end = start + kv.shape[0]
        if not req.cached_len <= start <= end <= len(req.prompt_ids):
            raise EngineError(f"KV for positions [{start}, {end}) outside the reserved "
                              f"[{req.cached_len}, {len(req.prompt_ids)})")
        self.kv.pool.scatter(self.runner.slots(req.pages, end)[start:], kv)

    def activate(self, rid: str, first_token: int, logprob: float | None = None,
                 top_logprobs=None, num_cached_prompt: int | None = None) -> StepOutput:
        """The prompt's KV is complete: decode on from the token the prefill sampled."""
        req = self._reserved.pop(rid)
        req.num_computed = len(req.prompt_ids)
        req.num_cached_prompt = req.cached_len if num_cached_prompt is None else num_cached_prompt
        self.kv.cache_prefix(req)
        self.scheduler.add_running(req)
        self._requests[rid] = req
        req.output_ids.append(first_token)
        return self._emit(req, len(req.output_ids) - 1, first_token, logprob, top_logprobs)

    def _check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise EngineError("prompt is empty")
        if len(prompt_ids) >= self.context_len:
            raise EngineError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.context_len} "
                              f"(prompt plus at least one generated token)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")

    def abort(self, rid: str) -> bool:
        """Drop a request and free every page it holds at once."""
        req = self._requests.pop(rid, None)
        if req is None:
            req = self._reserved.pop(rid, None)
            if req is None:
                return False
            self.kv.release(req, keep=False)
            req.finish_reason = "abort"
            return True
        self.scheduler.remove(req, keep=False)
        self.runner.forget(req)
        req.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.executor.busy

    def load(self) -> tuple[int, int, float]:
        """(running, waiting, fraction of KV pages in use, cache included)."""
        alloc = self.kv.allocator
        used = 1.0 - alloc.num_free / max(1, alloc.num_pages - 1)
        return len(self.scheduler.running), len(self.scheduler.waiting), used

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.last_batch = self.scheduler.schedule()
        if batch is not None:
            self._advance(batch, self.executor.run(batch, self._sampling_batch(batch)))
        return self._postprocess(self.executor.collect())

    def _sampling_batch(self, batch: ScheduledBatch) -> SamplingBatch | None:
        sampling = [c.req for c in batch.chunks if c.sample]
        if not sampling:
            return None
        if all(r.plain_greedy for r in sampling):      # the common case, without a pass per stage
            return SamplingBatch.plain_greedy(len(sampling), self.model_config.vocab_size, self.device)
        inputs = [SamplingInput(r.params, r.prompt_ids, r.output_ids, r.eos_token_ids) for r in sampling]
        return SamplingBatch.build(inputs, self.model_config.vocab_size, self.device, self.executor.resolve)

    def _advance(self, batch: ScheduledBatch, placeholders: list[int]) -> None:
        """What the launched step will have done: its positions are computed, and each
        sampling request holds a placeholder for its new token (at index
        chunk.start + chunk.n - len(prompt) of output_ids) until postprocess."""
        it = iter(placeholders)
        for req, start, n, sample in batch.chunks:
            req.num_computed = start + n
            if sample:
                req.output_ids.append(next(it))

    def _postprocess(self, step: LaunchedStep | None) -> list[StepOutput]:
        if step is None:
            return []
        out = step.result()                             # None: no chunk of the step samples
        tokens, lps, tops = (out.token_ids, out.logprobs, out.top_logprobs) if out is not None else ((), None, None)
        finished = Status.FINISHED
        known, row = [], -1                             # (request, index in output_ids, sample row)
        for req, start, n, sample in step.batch.chunks:
            if sample:
                row += 1
                if req.status is not finished:          # else it ended a step earlier: drop the extra token
                    idx = start + n - len(req.prompt_ids)
                    req.output_ids[idx] = tokens[row]
                    known.append((req, idx, row))
        for req, start, n, sample in step.batch.chunks:
            if n > 1 and req.status is Status.RUNNING:
                self.kv.cache_prefix(req)
        emit = self._emit
        return [emit(req, idx, tokens[row], lps[row] if lps else None, tops[row] if tops else None)
                for req, idx, row in known]

    def _emit(self, req: Request, idx: int, tok: int, lp: float | None, top) -> StepOutput:
        """Output token idx (already in output_ids) is known: record it, finish the request
        if it ends here (dropping a token launched after it)."""
        if req.params.logprobs:
            req.output_logprobs.append(lp)
            if req.params.top_logprobs:
                req.output_top_logprobs.append(top or [])
        reason = self._finish_reason(req, tok, idx + 1)
        kv = None
        if reason is not None:
            del req.output_ids[idx + 1:]
            req.num_computed = min(req.num_computed, req.seq_len - 1)
            if req.export_kv_from is not None:
                kv = self.kv.pool.gather(self.runner.slots(req.pages, len(req.prompt_ids))[req.export_kv_from:])
            req.finish_reason = reason
            self.scheduler.remove(req, keep=True)
            self.runner.forget(req)
            self._requests.pop(req.rid, None)
        return StepOutput(req.rid, [tok], reason is not None, reason,
                          [lp] if req.params.logprobs else None,
                          [top or []] if req.params.top_logprobs else None,
                          req.num_cached_prompt, kv)

    def _finish_reason(self, req: Request, tok: int, n: int) -> str | None:
        """Why the request ends with its n-th output token `tok`, or None."""
        p = req.params
        if n >= p.min_new_tokens:
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in req.eos_token_ids):
                return "stop"
        if len(req.prompt_ids) + n >= req.max_seq_len:
            return "length"
        return None

    # -- offline API ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int] | list[dict], chat: bool = False) -> list[int]:
        if not isinstance(prompt, str) and not chat:
            return list(prompt)
        if self.tokenizer is None:
            raise EngineError("this model has no tokenizer: pass token ids")
        if chat:
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.apply_chat_template(msgs)
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 chat: bool = False) -> list[GenerateResult]:
        """Run a batch to completion; results in prompt order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        rids = [self.add_request(self.encode_prompt(p, chat), sp) for p, sp in zip(prompts, plist)]
        reqs = {rid: self._requests[rid] for rid in rids}
        while self.has_unfinished():
            self.step()
        return [self._result(reqs[rid]) for rid in rids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[StepOutput]:
        """One request, token by token (other queued requests advance too)."""
        rid = self.add_request(self.encode_prompt(prompt, chat), params)
        try:
            while True:
                for out in self.step():
                    if out.rid == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)

    def _result(self, req: Request) -> GenerateResult:
        # Text leaves out special tokens (the EOS that ended it), as OpenAI-style APIs do.
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True) if self.tokenizer else None
        return GenerateResult(req.rid, req.prompt_ids, req.output_ids, req.finish_reason, text,
                              req.num_cached_prompt, req.output_logprobs, req.output_top_logprobs)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        held = sum(len(r.pages) - r.cached_len // self.kv.ps
                   for r in [*self.scheduler.running, *self._reserved.values()])
        cache_pages = self.kv.cache.total_pages if self.kv.cache else 0
        total = self.kv.allocator.num_pages - 1
        assert self.kv.allocator.num_free + cache_pages + held == total, "pages leaked or double-counted"
