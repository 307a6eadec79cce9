"""The gateway's core: models, admission, and one request's way through the workers.

REST and gRPC call Gateway.generate() with a GenRequest; it routes (router.py),
opens Worker.Decode on the chosen decode worker (naming the prefill worker),
detokenizes incrementally, applies stop strings and yields GenChunks. A worker
that fails before the request is done is replaced: the request resumes on
another one from the tokens already streamed, so the caller sees one stream.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from services.common.tokenizer import IncrementalDetokenizer, Tokenizer
from services.common.sampling_proto import to_proto as sampling_to_proto
from tandem.v1 import worker_pb2

from . import metrics
from .config import GatewayConfig
from .decode_mux import WorkerCallError, update_error
from .index import GlobalIndex
from .router import Router
from .stop_strings import StopStrings
from .types import ApiError, GenChunk, GenRequest, new_id
from .workers import Worker

log = logging.getLogger("tandem.gateway")



def _load_tokenizer(info: worker_pb2.InfoResponse) -> Tokenizer:
    tok = Tokenizer.from_strings(info.tokenizer_json, info.tokenizer_config_json or "{}", "{}", info.model)
    for skip in (False, True):      # the detokenizer's tables, now rather than in a first request
        tok.byte_pieces(skip)
    return tok


@dataclass
class ModelEntry:
    name: str
    tokenizer: Tokenizer
    context_length: int
    vocab_size: int


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.index = GlobalIndex(cfg.speculative_ttl_s)
        self.router = Router(self.index, cfg.policy)
        if cfg.decode_transport not in ("auto", "grpc"):
            raise ValueError(f"decode_transport: must be auto or grpc, got {cfg.decode_transport!r}")
        self.workers: dict[str, Worker] = {a: Worker(a, self.index, self._on_info,
                                                     framed=cfg.decode_transport == "auto")
                                           for a in cfg.worker}
        self.models: dict[str, ModelEntry] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self.inflight = 0

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        for w in self.workers.values():
            w.start()

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers.values()), return_exceptions=True)

    def _on_info(self, worker: Worker, info: worker_pb2.InfoResponse):
        if info.model in self.models:
            return None
        task = self._loading.get(info.model)
        if task is None:
            task = asyncio.create_task(self._load_model(info))
            self._loading[info.model] = task
        return task

    async def _load_model(self, info: worker_pb2.InfoResponse) -> None:
        tok = await asyncio.to_thread(_load_tokenizer, info)
        self.models[info.model] = ModelEntry(info.model, tok, info.context_length, info.vocab_size)
        log.warning("model %s: tokenizer loaded from worker (context %d)", info.model, info.context_length)

    def ready(self) -> bool:
        """At least one worker that prefills and one that decodes, with their model known."""
        live = [w.state for w in self.workers.values() if w.state.healthy and w.state.model in self.models]
        return any(s.can_prefill for s in live) and any(s.can_decode for s in live)

    def model(self, name: str) -> ModelEntry:
        if not name:
            if not self.models:
                raise ApiError(503, "no model is ready yet", retry_after=1)
            return next(iter(self.models.values()))
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none ready yet"
            raise ApiError(404, f"model {name!r} does not exist (served: {known})", "model", "model_not_found")
        return entry

    def num_workers(self, model: str) -> int:
        return sum(1 for w in self.workers.values() if w.state.healthy and w.state.model == model)

    # -- one request -----------------------------------------------------------------------------
    def check_prompt(self, entry: ModelEntry, ids: list[int], param: str, max_tokens: int,
                     max_tokens_param: str = "max_tokens") -> None:
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param)
        bad = next((t for t in ids if not 0 <= t < entry.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary [0, {entry.vocab_size})", param)
        n, ctx = len(ids), entry.context_length
        if n >= ctx:
            raise ApiError(400, f"{param}: the prompt has {n} tokens; the model's context is {ctx} tokens", param)
        if n + max_tokens > ctx:
            raise ApiError(400, f"{max_tokens_param}: {max_tokens} new tokens after a prompt of {n} exceed "
                                f"the model's context of {ctx} tokens (at most {ctx - n})", max_tokens_param)

    async def generate(self, req: GenRequest) -> AsyncIterator[GenChunk]:
        """The chunks of one request; errors (ApiError) come out of the first anext()
        unless the request failed after it started."""
        if self.inflight >= self.cfg.max_inflight:
            metrics.REJECTED.inc()
            raise ApiError(429, f"the gateway is at its limit of {self.cfg.max_inflight} requests in flight",
                           retry_after=1)
        entry = self.model(req.model)
        self.inflight += 1
        metrics.INFLIGHT.inc()
        try:
            rid = req.request_id or new_id()
            detok = IncrementalDetokenizer(entry.tokenizer, req.skip_special_tokens)
            lp = req.params.logprobs
            stops = StopStrings(req.stop, req.include_stop_str) if req.stop else None
            out_ids: list[int] = []
            tried: set[str] = set()
            failures = 0
            t0 = time.perf_counter()
            first = True
            while True:
                params = req.params
                if out_ids:                          # resuming on another worker
                    params = dataclasses.replace(params, max_new_tokens=params.max_new_tokens - len(out_ids),
                                                 min_new_tokens=max(0, params.min_new_tokens - len(out_ids)))
                prompt = req.prompt_ids + out_ids
                route = self.router.route([w.state for w in self.workers.values()], entry.name, prompt,
                                          frozenset(tried))
                route.charge()
                mux = self.workers[route.decode.address].decoder
                wire_rid, q = mux.open(worker_pb2.DecodeRequest(
                    request_id=f"{rid}-{failures}" if failures else rid, prompt_ids=prompt,
                    sampling=sampling_to_proto(params),
                    prefill_address=route.prefill.address if route.prefill else ""))
                done = False
                try:
                    while True:
                        ups = await q.take()             # all that came since: one chunk, one write
                        if first:
                            metrics.TTFT.observe(time.perf_counter() - t0)
                            first = False
                        route.prefill_done()
                        last = ups[-1]
                        if isinstance(last, WorkerCallError):
                            ups.pop()
                        ids = list(ups[0].token_ids) if len(ups) == 1 else [t for u in ups for t in u.token_ids]
                        if isinstance(last, WorkerCallError) or last.error_code:
                            out_ids += ids                # what did arrive still counts on a retry
                            if ids:
                                yield self._chunk(ids, ups, detok, stops, None, lp)[0]
                            raise last if isinstance(last, WorkerCallError) else update_error(last)
                        out_ids += ids
                        reason = last.finish_reason or None
                        chunk, reason = self._chunk(ids, ups, detok, stops, reason, lp)
                        if reason:
                            chunk.prompt_tokens = len(req.prompt_ids)
                            chunk.completion_tokens = len(out_ids)
                            chunk.cached_tokens = last.usage.cached_tokens
                            done = True
                            metrics.GENERATED.inc(len(out_ids))
                            metrics.E2E.observe(time.perf_counter() - t0)
                        yield chunk
                        if done:
                            return
                except WorkerCallError as e:
                    failures += 1
                    self._failed(e, rid, route, failures, tried)
                finally:
                    route.finish()
                    mux.cancel(wire_rid)     # a no-op once the worker finished it; else (a stop string,
                                             # the caller gone) it frees the request's pages there
        finally:
            self.inflight -= 1
            metrics.INFLIGHT.dec()

    def _failed(self, e: WorkerCallError, rid: str, route, failures: int, tried: set[str]) -> None:
        """A worker failed the request: an ApiError if retrying cannot help, else note
        the workers to avoid on the retry."""
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ApiError(400, details, details.split(":", 1)[0]) from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise ApiError(503, f"workers are out of KV memory: {details}", retry_after=1) from None
        metrics.RETRIES.inc()
        tried.add(route.decode.address)
        if route.prefill is not None and "prefill worker" in details:
            tried.add(route.prefill.address)
        log.warning("request %s: worker %s failed (%s: %s); %s", rid, route.decode.address, code.name,
                    details, "retrying" if failures <= self.cfg.max_retries else "giving up")
        if failures > self.cfg.max_retries:
            raise ApiError(503, f"request failed on {failures} workers: {details}", retry_after=1) from None

    @staticmethod
    def _chunk(ids, ups, detok, stops, reason, logprobs: bool):
        """The GenChunk of these new ids (text through the detokenizer and stop strings)."""
        text = detok.add(ids)
        if reason:
            text += detok.flush()
        if stops is not None:
            text, hit = stops.feed(text, final=reason is not None)
            if hit:
                reason = "stop"
        lps = [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
               for u in ups for lp in u.logprobs] if logprobs else []
        return GenChunk(ids, text, lps, reason), reason
