"""One Worker.DecodeStream per decode worker, shared by all of a gateway's requests.

A request registers a queue under its request id and its DecodeRequest goes
out with whatever else is waiting (one message carries many starts and
cancels); one reader hands each DecodeUpdate of a batch to its request's
queue. gRPC's cost per message is then paid per engine step instead of per
request and token. When the stream breaks or ends, every request still on it
gets a WorkerCallError (UNAVAILABLE) and the gateway retries it elsewhere; the
next request opens a fresh stream.
"""
from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.gateway")


class WorkerCallError(Exception):
    """A request failed on a worker: the status it sent, or UNAVAILABLE when the stream broke.
    code() and details() read as on grpc.aio.AioRpcError."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def update_error(u: worker_pb2.DecodeUpdate) -> WorkerCallError:
    return WorkerCallError(_CODES.get(u.error_code, grpc.StatusCode.UNKNOWN), u.error_message)


class DecodeMux:
    def __init__(self, stub, address: str):
        self.stub = stub
        self.address = address
        self.queues: dict[str, asyncio.Queue] = {}
        self._starts: list[worker_pb2.DecodeRequest] = []
        self._cancels: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._suffix = itertools.count(1)

    def open(self, request: worker_pb2.DecodeRequest) -> tuple[str, asyncio.Queue]:
        """Send request; (its id on the stream, the queue its DecodeUpdates arrive on)."""
        rid = request.request_id
        if rid in self.queues:                        # ids are unique per stream
            rid = request.request_id = f"{rid}.{next(self._suffix)}"
        q: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = q
        self._starts.append(request)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"decode stream {self.address}")
        return rid, q

    def cancel(self, rid: str) -> None:
        """Stop a request the caller no longer reads (frees its pages on the worker)."""
        if self.queues.pop(rid, None) is not None and self._task is not None:
            self._cancels.append(rid)
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        call = self.stub.DecodeStream()
        writer = asyncio.create_task(self._write(call))
        why = "the decode stream ended"
        try:
            async for batch in call:
                queues = self.queues
                for u in batch.updates:
                    q = queues.get(u.request_id)
                    if q is None:
                        continue
                    q.put_nowait(u)
                    if u.finish_reason or u.error_code:
                        del queues[u.request_id]
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            why = "the gateway is shutting down"
            raise
        finally:
            writer.cancel()
            call.cancel()
            self._task = None
            self._fail_all(why)

    async def _write(self, call) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                msg = worker_pb2.DecodeStreamRequest(start=self._starts, cancel=self._cancels)
                self._starts, self._cancels = [], []
                await call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.info("decode stream to %s: write failed: %s", self.address, e)

    def _fail_all(self, why: str) -> None:
        queues, self.queues = self.queues, {}
        self._starts, self._cancels = [], []
        if queues:
            log.warning("decode stream to %s broke with %d requests on it: %s", self.address, len(queues), why)
        err = WorkerCallError(grpc.StatusCode.UNAVAILABLE, f"worker {self.address}: {why}")
        for q in queues.values():
            q.put_nowait(err)
