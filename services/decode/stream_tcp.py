"""Worker.DecodeStream over framed TCP (services/common/framed.py): the gateways' fast path.

The same messages (DecodeStreamRequest in, DecodeStreamBatch out) and the same
DecodeStream behind them as the gRPC method, on a port of its own that the
worker names in Info.decode_stream_port; gateways use it when it is there and
fall back to the gRPC method when it is not (or cannot be reached). One
connection is one stream; a caller that expects another worker id (a port
reused after a restart) is refused. The caller closing its side, or the
connection going away, aborts every request still on it (a gateway never
half-closes: its end means it is gone, as a cancelled gRPC call).
"""
from __future__ import annotations

import asyncio
import logging

from services.common.framed import FramedProtocol
from services.worker.state import WorkerState
from tandem.v1 import worker_pb2

from .stream import DecodeStream, run

log = logging.getLogger(__name__)


class _Connection:
    def __init__(self, w: WorkerState, live: set):
        self.stream = DecodeStream(w, self._send)
        self.proto = FramedProtocol(worker_pb2.DecodeStreamRequest.FromString, self.stream.on_message,
                                    self._on_lost, server=True, identity=w.worker_id)
        self.task = asyncio.get_running_loop().create_task(self._run())
        live.add(self.task)
        self.task.add_done_callback(live.discard)

    def _on_lost(self, why: str | None) -> None:
        if why:
            log.info("decode stream from %s: %s", self.proto.peer(), why)
        self.stream.close()                   # abort what is left (also what started before run() did)
        self.task.cancel()

    async def _send(self, batch) -> None:
        self.proto.send(batch)
        await self.proto.drain()

    async def _run(self) -> None:
        try:
            await run(self.stream)
        finally:
            self.proto.close()


class DecodeStreamServer:
    def __init__(self, w: WorkerState):
        self.w = w
        self.server: asyncio.Server | None = None
        self.live: set[asyncio.Task] = set()

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on host:port (0: any free port; "[::]" as gRPC writes it is "::"); the port
        listened on, or 0 (not offered: gateways use gRPC) when it cannot listen."""
        loop = asyncio.get_running_loop()
        host = host.strip("[]") or None
        try:
            self.server = await loop.create_server(lambda: _Connection(self.w, self.live).proto, host, port,
                                                   backlog=1024)
        except OSError as e:
            log.warning("decode stream: cannot listen on %s:%d (%s); gateways will use gRPC", host, port, e)
            return 0
        ports = {s.getsockname()[1] for s in self.server.sockets}
        if len(ports) > 1:                    # port 0 on a host of several addresses: one port each
            log.warning("decode stream: %s listens on several ports %s; not offered", host, sorted(ports))
            self.server.close()
            self.server = None
            return 0
        return ports.pop()

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; streams end as their requests finish (the drain woke them),
        and whatever still runs after grace_s is aborted."""
        if self.server is None:
            return
        self.server.close()
        if self.live:
            _, pending = await asyncio.wait(set(self.live), timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
