"""The engine: Engine.step() is schedule -> run -> postprocess.

Requests come in as token ids with SamplingParams; each step yields the new
tokens of every request that sampled. `generate` (batches) and `stream` (one
request) are thin loops over step() for offline use.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .config import EngineConfig
from .request import Request
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
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    rid: str | None = None) -> str:
        params = params or SamplingParams()
        params.validate(self.model_config.vocab_size)
        self._check_prompt(prompt_ids)
        rid = rid if rid is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise EngineError(f"rid {rid!r} is already in use")
        req = Request(rid, list(prompt_ids), params, self.eos_token_ids)
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

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
            return False
        self.scheduler.remove(req, keep=False)
        req.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self.runner.run(batch)
        return self._postprocess(batch, logits)

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[StepOutput]:
        sampling = [c.req for c in batch.chunks if c.sample]
        for c in batch.chunks:
            c.req.num_computed = c.start + c.n
            if c.n > 1:
                self.kv.cache_prefix(c.req)
        if not sampling:
            return []
        inputs = [SamplingInput(r.params, r.prompt_ids, r.output_ids, r.eos_token_ids) for r in sampling]
        out = self.sampler(logits, SamplingBatch.build(inputs, self.model_config.vocab_size, logits.device))
        results = []
        for i, req in enumerate(sampling):
            results.append(self._append(req, out.token_ids[i],
                                        out.logprobs[i] if out.logprobs else None,
                                        out.top_logprobs[i] if out.top_logprobs else None))
        return results

    def _append(self, req: Request, tok: int, lp: float | None, top) -> StepOutput:
        req.output_ids.append(tok)
        if req.params.logprobs:
            req.output_logprobs.append(lp)
            if req.params.top_logprobs:
                req.output_top_logprobs.append(top or [])
        reason = self._finish_reason(req, tok)
        if reason is not None:
            req.finish_reason = reason
            self.scheduler.remove(req, keep=True)
            self._requests.pop(req.rid, None)
        return StepOutput(req.rid, [tok], reason is not None, reason,
                          [lp] if req.params.logprobs else None,
                          [top or []] if req.params.top_logprobs else None)

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        n = len(req.output_ids)
        if n >= p.min_new_tokens:
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in req.eos_token_ids):
                return "stop"
        if n >= p.max_new_tokens or req.seq_len >= self.context_len:
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
        held = sum(len(r.pages) - r.cached_len // self.kv.ps for r in self.scheduler.running)
        cache_pages = self.kv.cache.total_pages if self.kv.cache else 0
        total = self.kv.allocator.num_pages - 1
        assert self.kv.allocator.num_free + cache_pages + held == total, "pages leaked or double-counted"
