"""Worker.DecodeStream over framed TCP (services/common/framed.py): the gateways' fast path.

The same messages (DecodeStreamRequest in, DecodeStreamBatch out) and the same
DecodeStream behind them as the gRPC method, on a port of its own that the
worker names in Info.decode_stream_port; gateways use it when it is there and
fall back to the gRPC method when it is not (or cannot be reached). One
connection is one stream: the caller ending its side ends the stream once its
requests are done; the connection going away aborts them all.
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
        self.proto = FramedProtocol(worker_pb2.DecodeStreamRequest.FromString, self._on_message, self._on_lost,
                                    self._on_eof, server=True)
        self.stream = DecodeStream(w, self._send)
        self.task = asyncio.get_running_loop().create_task(self._run())
        live.add(self.task)
        self.task.add_done_callback(live.discard)

    def _on_message(self, msg) -> None:
        self.stream.on_message(msg)

    def _on_eof(self) -> None:
        self.stream.end_input()

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
        """Listen on host:port (0: any free port); the port listened on."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self.w, self.live).proto, host, port,
                                               backlog=1024)
        return self.server.sockets[0].getsockname()[1]

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
