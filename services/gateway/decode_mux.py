"""One decode stream per decode worker, shared by all of a gateway's requests.

A request registers an inbox under its request id and its DecodeRequest goes
out with whatever else is waiting (one message carries many starts and
cancels); each DecodeUpdate of a batch that comes back is handed to its
request's inbox. The per-message cost of the transport is then paid per engine
step instead of per request and token. The stream is framed protobuf over TCP
(services/common/framed.py) when the worker offers it (Info.decode_stream_port),
else Worker.DecodeStream over gRPC; a framed connection that cannot be made
falls back to gRPC. When the stream breaks or ends, every request still on it
gets a WorkerCallError (UNAVAILABLE) and the gateway retries it elsewhere; the
next request opens a fresh stream.
"""
from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from services.common.framed import FramedProtocol
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.gateway")

CONNECT_TIMEOUT_S = 5.0


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


class Inbox:
    """One request's DecodeUpdates (or a WorkerCallError, last) as they arrive;
    take() waits for the first and returns everything that came since the last take."""
    __slots__ = ("items", "_waiter")

    def __init__(self):
        self.items: list = []
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def take(self) -> list:
        if not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        items, self.items = self.items, []
        return items


class DecodeMux:
    def __init__(self, stub, address: str):
        self.stub = stub
        self.address = address
        # The worker's framed stream: (host, port, worker id it must answer as); None: gRPC.
        self.tcp: tuple[str, int, str] | None = None
        self.queues: dict[str, Inbox] = {}
        self._starts: list[worker_pb2.DecodeRequest] = []
        self._cancels: list[str] = []
        self._link: _GrpcLink | _TcpLink | None = None
        self._suffix = itertools.count(1)

    def open(self, request: worker_pb2.DecodeRequest) -> tuple[str, Inbox]:
        """Send request; (its id on the stream, the inbox its DecodeUpdates arrive in)."""
        rid = request.request_id
        if rid in self.queues:                        # ids are unique per stream
            rid = request.request_id = f"{rid}.{next(self._suffix)}"
        q = self.queues[rid] = Inbox()
        self._starts.append(request)
        if self._link is None:
            self._link = _TcpLink(self, *self.tcp) if self.tcp else _GrpcLink(self)
        self._link.kick()
        return rid, q

    def cancel(self, rid: str) -> None:
        """Stop a request the caller no longer reads (frees its pages on the worker)."""
        if self.queues.pop(rid, None) is not None and self._link is not None:
            self._cancels.append(rid)
            self._link.kick()

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()

    # -- what the links call ---------------------------------------------------------------------
    def take(self) -> worker_pb2.DecodeStreamRequest | None:
        """Everything waiting to go out, as one message (None: nothing)."""
        if not self._starts and not self._cancels:
            return None
        msg = worker_pb2.DecodeStreamRequest(start=self._starts, cancel=self._cancels)
        self._starts, self._cancels = [], []
        return msg

    def dispatch(self, batch: worker_pb2.DecodeStreamBatch) -> None:
        queues = self.queues
        for u in batch.updates:
            q = queues.get(u.request_id)
            if q is None:
                continue
            q.put(u)
            if u.finish_reason or u.error_code:
                del queues[u.request_id]

    def broken(self, link, why: str) -> None:
        if link is not self._link:
            return
        self._link = None
        queues, self.queues = self.queues, {}
        self._starts, self._cancels = [], []
        if queues:
            log.warning("decode stream to %s broke with %d requests on it: %s", self.address, len(queues), why)
        err = WorkerCallError(grpc.StatusCode.UNAVAILABLE, f"worker {self.address}: {why}")
        for q in queues.values():
            q.put(err)

    def unreachable(self, link, why: str) -> None:
        """The framed connection could not be made (nothing was sent on it): gRPC from now on."""
        if link is not self._link:
            return
        log.warning("worker %s: no framed decode stream (%s); using gRPC DecodeStream", self.address, why)
        self.tcp = None
        self._link = _GrpcLink(self)
        self._link.kick()


class _GrpcLink:
    """Worker.DecodeStream: a reader (this task) and a writer that sends what is waiting when kicked."""

    def __init__(self, mux: DecodeMux):
        self.mux = mux
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"decode stream {mux.address}")

    def kick(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        call = self.mux.stub.DecodeStream()
        writer = asyncio.create_task(self._write(call))
        why = "the decode stream ended"
        try:
            async for batch in call:
                self.mux.dispatch(batch)
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            why = "the gateway is shutting down"
            raise
        finally:
            writer.cancel()
            call.cancel()
            self.mux.broken(self, why)

    async def _write(self, call) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                msg = self.mux.take()
                if msg is not None:
                    await call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.info("decode stream to %s: write failed: %s", self.mux.address, e)


class _TcpLink:
    """The framed stream: batches are dispatched as they are parsed; what is waiting
    goes out once per event-loop pass (call_soon), so a burst of requests is one write."""

    def __init__(self, mux: DecodeMux, host: str, port: int, worker_id: str = ""):
        self.mux = mux
        self.proto = FramedProtocol(worker_pb2.DecodeStreamBatch.FromString, mux.dispatch, self._lost, server=False,
                                    expect=worker_id)
        self._connected = self._scheduled = False
        self._task = asyncio.create_task(self._connect(host, port), name=f"decode stream {mux.address}")

    async def _connect(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self.proto, host, port), CONNECT_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:                    # refused, unreachable, timed out, a bad host name
            return self.mux.unreachable(self, f"{host}:{port}: {e or type(e).__name__}")
        self._connected = True
        self._flush()

    def kick(self) -> None:
        if self._connected and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.mux._link is not self or self.proto.closed:
            return                                # replaced or gone: what waits is the next link's
        msg = self.mux.take()
        if msg is not None:
            self.proto.send(msg)

    def _lost(self, why: str | None) -> None:
        self.mux.broken(self, why or "the decode stream ended")

    def close(self) -> None:
        self._task.cancel()
        self.proto.close()
        self.mux.broken(self, "the gateway is shutting down")
