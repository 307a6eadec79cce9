"""Framed protobuf messages over one TCP connection: the fast path of a long-lived stream.

grpc.aio pays two thread hops per message (its completion-queue poller thread
wakes the event loop through a socket pair), about 0.2 ms a message each way on
a small machine; a stream of many small messages (a decode worker's token
batches) pays it for every engine step. This is the same exchange on a plain
asyncio transport: each message is a little-endian uint32 length and the
serialized protobuf. The client opens with MAGIC and a line naming the peer it
expects (a worker id; empty: any), so that a stray connection, a peer of
another version, or another process now on a reused port is refused before
any message is read. Messages are parsed and handed to a callback inside
data_received: no queue, no task hop. TCP keepalive (30 s idle, then 3 probes
10 s apart) notices a peer whose host is gone, as gRPC's keepalive pings do.

Flow control is the transport's: send() never blocks, and a writer that must
not outrun its reader awaits drain(), which returns once the kernel buffer
has room again (pause_writing / resume_writing).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable

from .grpc_utils import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

MAGIC = b"TANDEM-FRAMED/1\n"
_HEADER = struct.Struct("<I")
_MAX_HELLO = 256                  # the line after MAGIC
_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


class FramedProtocol(asyncio.Protocol):
    """One connection. parse(bytes) -> message; on_message(message) for each frame
    in order; on_lost(reason or None) once, when it is gone (the peer ending its side
    closes the connection).
    A client sends `expect` after MAGIC; a server refuses a peer whose expected id is
    neither empty nor `identity`."""

    def __init__(self, parse: Callable, on_message: Callable, on_lost: Callable[[str | None], None],
                 *, server: bool, max_frame: int = MAX_MESSAGE_BYTES, identity: str = "", expect: str = ""):
        self.parse, self.on_message, self.on_lost = parse, on_message, on_lost
        self.max_frame = max_frame
        self.identity, self.expect = identity, expect
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._need_magic = server
        self._paused: asyncio.Future | None = None
        self._why: str | None = None
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in _KEEPALIVE:
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if not self._need_magic:
            transport.write(MAGIC + self.expect.encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        if self._need_magic:
            if not MAGIC.startswith(bytes(buf[:len(MAGIC)])):
                return self.abort("the peer does not speak the framed protocol")
            end = buf.find(b"\n", len(MAGIC))
            if end < 0:
                if len(buf) > len(MAGIC) + _MAX_HELLO:
                    return self.abort("the peer's hello line is too long")
                return
            expect = bytes(buf[len(MAGIC):end]).decode("utf-8", "replace")
            if expect and expect != self.identity:
                return self.abort(f"the peer expects worker {expect!r}; this is {self.identity!r}")
            self._need_magic = False
            pos = end + 1
        view = memoryview(buf)
        try:
            while len(buf) - pos >= 4 and not self.closed:
                (n,) = _HEADER.unpack_from(buf, pos)
                if n > self.max_frame:
                    return self.abort(f"a frame of {n} bytes is over the limit of {self.max_frame}")
                end = pos + 4 + n
                if end > len(buf):
                    break
                try:
                    msg = self.parse(view[pos + 4:end])
                except Exception as e:            # protobuf's DecodeError, and any other
                    return self.abort(f"a frame does not parse: {e}")
                pos = end
                self.on_message(msg)
        finally:
            view.release()
        if pos:
            del buf[:pos]

    def connection_lost(self, exc) -> None:
        if self.closed and self._why is None and exc is None:
            why = None
        else:
            why = self._why or (f"connection lost: {exc}" if exc else "the peer closed the connection")
        self.closed = True
        self._wake_writers()
        self.on_lost(why)

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writers()

    # -- use -------------------------------------------------------------------------------------
    def send(self, msg) -> None:
        """Queue one message (never blocks; see drain)."""
        if self.closed or self.transport is None:
            return
        data = msg.SerializeToString()
        self.transport.write(_HEADER.pack(len(data)) + data)

    async def drain(self) -> None:
        """Wait until the transport takes more (returns at once when it is not paused or closed)."""
        while self._paused is not None and not self.closed:
            await asyncio.shield(self._paused)

    def close(self) -> None:
        """Send what is queued, then close."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self, why: str) -> None:
        log.warning("framed connection %s: %s; closing it", self.peer(), why)
        self._why = why
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def peer(self) -> str:
        p = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{p[0]}:{p[1]}" if isinstance(p, tuple) else str(p)

    def _wake_writers(self) -> None:
        if self._paused is not None:
            if not self._paused.done():
                self._paused.set_result(None)
            self._paused = None
