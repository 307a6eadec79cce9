"""Worker.DecodeStream: many requests over one stream, one batch per flush.

The caller (a gateway) sends DecodeRequests and cancels whenever it likes;
each starts like a Decode call (service.start). Every engine output lands in
this stream's pending updates (one DecodeUpdate per request, tokens appended)
and a single writer sends whatever is pending as one DecodeStreamBatch: one
message per engine step at most, and fewer when the caller reads slower than
the engine makes tokens, so gRPC's per-message cost is paid per step, not per
request and token. A request that fails gets a last update with its status.
When the caller goes away every request of the stream is aborted.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import grpc

from services.engine.engine import StepOutput
from services.worker import metrics
from services.worker.convert import logprobs_to_proto
from services.worker.state import WorkerState
from tandem.v1 import worker_pb2

from .service import DecodeFailed, finish, start, trace_metadata

log = logging.getLogger(__name__)


class _Request:
    __slots__ = ("prompt_len", "n_out", "starting")

    def __init__(self, prompt_len: int, starting: asyncio.Task | None):
        self.prompt_len = prompt_len
        self.n_out = 0
        self.starting = starting          # the start task until the request runs


class DecodeStream:
    """One stream's requests, whatever carries it: `send(batch)` is awaited for each
    batch out (gRPC's context.write, or a framed connection's send + drain), and
    the caller's messages come in through on_message() (or read(), an async iterator of them)."""

    def __init__(self, w: WorkerState, send: Callable[[worker_pb2.DecodeStreamBatch], Awaitable[None]],
                 trace: tuple = ()):
        self.w = w
        self.send = send
        self.trace = trace
        self.live: dict[str, _Request] = {}
        self.pending: dict[str, worker_pb2.DecodeUpdate] = {}
        self.wake = asyncio.Event()
        self.eof = False

    # -- the sink of every request of this stream (called on the event loop) ---------------------
    def put_nowait(self, out: StepOutput) -> None:
        req = self.live.get(out.rid)
        if req is None:
            return
        u = self._update(out.rid)
        u.token_ids.extend(out.new_token_ids)
        if out.logprobs:
            u.logprobs.extend(logprobs_to_proto(out.logprobs, out.top_logprobs))
        req.n_out += len(out.new_token_ids)
        if out.finished:
            err = finish(u, out, req.prompt_len, req.n_out)
            if err:
                u.error_code, u.error_message = grpc.StatusCode.INTERNAL.value[0], err
            self._forget(out.rid)
        self.wake.set()

    def _update(self, rid: str) -> worker_pb2.DecodeUpdate:
        u = self.pending.get(rid)
        if u is None:
            u = self.pending[rid] = worker_pb2.DecodeUpdate(request_id=rid)
        return u

    def _forget(self, rid: str) -> None:
        self.live.pop(rid, None)
        self.w.loop.close_sink(rid)

    # -- requests in -----------------------------------------------------------------------------
    def on_message(self, msg: worker_pb2.DecodeStreamRequest) -> None:
        for r in msg.start:
            self._start(r)
        for rid in msg.cancel:
            self._cancel(rid)

    async def read(self, requests) -> None:
        try:
            async for msg in requests:
                self.on_message(msg)
        finally:                          # the caller sends no more: the stream ends once its requests do
            self.eof = True
            self.wake.set()

    def _fail(self, rid: str, code: grpc.StatusCode, message: str) -> None:
        self.live.pop(rid, None)
        u = self._update(rid)
        u.error_code, u.error_message = code.value[0], message
        self.wake.set()

    def _start(self, r: worker_pb2.DecodeRequest) -> None:
        rid = r.request_id
        if not rid:
            return self._fail(rid, grpc.StatusCode.INVALID_ARGUMENT, "request_id: empty")
        if rid in self.live:              # ambiguous from here on: both go
            self._cancel(rid)
            return self._fail(rid, grpc.StatusCode.INVALID_ARGUMENT,
                              f"request_id: {rid!r} is already running on this stream")
        if self.w.draining:
            return self._fail(rid, grpc.StatusCode.UNAVAILABLE, "this worker is draining")
        req = self.live[rid] = _Request(len(r.prompt_ids), None)
        req.starting = asyncio.create_task(self._run_start(rid, r))

    async def _run_start(self, rid: str, r: worker_pb2.DecodeRequest) -> None:
        try:
            await start(self.w, rid, r, self, self.trace)
        except DecodeFailed as e:
            return self._fail(rid, e.code, e.message)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("request %s failed to start", rid)
            return self._fail(rid, grpc.StatusCode.INTERNAL, "internal error starting the request")
        req = self.live.get(rid)
        if req is not None:
            req.starting = None

    def _cancel(self, rid: str) -> None:
        req = self.live.pop(rid, None)
        if req is None:
            return
        self.pending.pop(rid, None)
        if req.starting is not None:
            req.starting.cancel()             # start() cleans up after itself
        else:
            self.w.loop.close_sink(rid)
            self.w.loop.post(self.w.loop.engine.abort, rid)

    # -- batches out -----------------------------------------------------------------------------
    async def write(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.pending:
                batch = worker_pb2.DecodeStreamBatch(updates=self.pending.values())
                self.pending = {}
                metrics.GENERATED_TOKENS.inc(sum(len(u.token_ids) for u in batch.updates))
                await self.send(batch)
            if (self.eof or self.w.draining) and not self.live and not self.pending:
                return          # the caller hung up, or a drain: end once every request is done

    def close(self) -> None:
        for rid in list(self.live):
            self._cancel(rid)


async def run(s: DecodeStream) -> None:
    """Write s's batches until it ends; then abort whatever of it still runs."""
    s.w.streams.add(s)
    try:
        await s.write()
    finally:
        s.w.streams.discard(s)
        s.close()


async def decode_stream(w: WorkerState, requests, context: grpc.aio.ServicerContext) -> None:
    """Worker.DecodeStream over gRPC."""
    if w.role == "prefill":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker has role prefill: it does not decode")
    s = DecodeStream(w, context.write, trace_metadata(context))
    reader = asyncio.create_task(s.read(requests))
    try:
        await run(s)
    finally:
        reader.cancel()
