"""services/common/framed.py (framed protobuf over TCP) and the gateway's DecodeMux on it:
frames cut anywhere, bad peers refused, flow control, a real loopback stream, the
fallback to gRPC when the framed port cannot be reached, and a broken stream failing
every request on it."""
from __future__ import annotations

import asyncio
import struct

import grpc
import pytest

from services.common.framed import MAGIC, FramedProtocol
from services.gateway.decode_mux import DecodeMux, Inbox, WorkerCallError
from tandem.v1 import common_pb2, worker_pb2


def _frame(msg) -> bytes:
    data = msg.SerializeToString()
    return struct.pack("<I", len(data)) + data


class _Transport:
    """What FramedProtocol asks of an asyncio transport."""

    def __init__(self):
        self.out = bytearray()
        self.aborted = self.closed = False

    def write(self, data):
        self.out += data

    def get_extra_info(self, name, default=None):
        return default

    def abort(self):
        self.aborted = True

    def close(self):
        self.closed = True


def _server_proto():
    got, lost = [], []
    p = FramedProtocol(worker_pb2.DecodeStreamRequest.FromString, got.append, lost.append, server=True,
                       max_frame=1 << 16, identity="w1")
    t = _Transport()
    p.connection_made(t)
    return p, t, got, lost


def _msgs(n):
    return [worker_pb2.DecodeStreamRequest(start=[worker_pb2.DecodeRequest(request_id=f"r{i}",
                                                                           prompt_ids=list(range(i + 1)))],
                                           cancel=[f"c{i}"] * (i % 3)) for i in range(n)]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 64, 10_000])
def test_frames_cut_anywhere_arrive_whole_and_in_order(cut):
    p, t, got, lost = _server_proto()
    msgs = _msgs(12)
    data = MAGIC + b"w1\n" + b"".join(_frame(m) for m in msgs)
    for i in range(0, len(data), cut):
        p.data_received(data[i:i + cut])
    assert got == msgs and not t.aborted and not p._buf


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.1\r\n\r\n", "does not speak"),
    (b"TANDEM-FRAMED/9\n", "does not speak"),
    (MAGIC + b"\n" + struct.pack("<I", 1 << 20), "over the limit"),
    (MAGIC + b"\n" + struct.pack("<I", 3) + b"\xff\xff\xff", "does not parse"),
    (MAGIC + b"w2\n", "expects worker 'w2'"),        # another process on a reused port
    (MAGIC + b"x" * 300, "too long"),
])
def test_a_bad_peer_is_refused(data, why, caplog):
    p, t, got, lost = _server_proto()
    p.data_received(data)
    assert t.aborted and not got
    assert why in caplog.text


def test_the_client_sends_the_magic_first():
    p = FramedProtocol(worker_pb2.DecodeStreamBatch.FromString, lambda m: None, lambda w: None, server=False,
                       expect="w1")
    t = _Transport()
    p.connection_made(t)
    p.send(worker_pb2.DecodeStreamRequest(cancel=["x"]))
    assert bytes(t.out) == MAGIC + b"w1\n" + _frame(worker_pb2.DecodeStreamRequest(cancel=["x"]))
    s, st, got, _ = _server_proto()                  # which that server takes, as any server takes b"\n"
    s.data_received(bytes(t.out))
    assert got == [worker_pb2.DecodeStreamRequest(cancel=["x"])] and not st.aborted


def test_drain_waits_while_paused():
    async def go():
        p, t, _, _ = _server_proto()
        await p.drain()                          # not paused: at once
        p.pause_writing()
        waiter = asyncio.create_task(p.drain())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        p.resume_writing()
        await asyncio.wait_for(waiter, 1)
        p.pause_writing()
        waiter = asyncio.create_task(p.drain())
        await asyncio.sleep(0.01)
        p.connection_lost(None)                  # a lost connection releases writers too
        await asyncio.wait_for(waiter, 1)
    asyncio.run(go())


async def _echo_worker(tokens: int):
    """A framed DecodeStream server that answers each start with `tokens` ids, one batch each."""
    conns = []

    def factory():
        proto = None

        def on_message(msg):
            for r in msg.start:
                for k in range(tokens):
                    u = worker_pb2.DecodeUpdate(request_id=r.request_id, token_ids=[k])
                    if k == tokens - 1:
                        u.finish_reason = "length"
                    proto.send(worker_pb2.DecodeStreamBatch(updates=[u]))

        proto = FramedProtocol(worker_pb2.DecodeStreamRequest.FromString, on_message, lambda why: None,
                               server=True)
        conns.append(proto)
        return proto

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def _drain(q: Inbox) -> list:
    out = []
    while True:
        for u in await q.take():
            if isinstance(u, Exception):
                return out + [u]
            out += u.token_ids
            if u.finish_reason:
                return out


def _req(rid: str) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id=rid, prompt_ids=[1, 2, 3],
                                    sampling=common_pb2.SamplingParams(max_new_tokens=5))


def test_mux_over_a_real_framed_connection():
    async def go():
        server, port, conns = await _echo_worker(5)
        mux = DecodeMux(stub=None, address=f"127.0.0.1:{port}")
        mux.tcp = ("127.0.0.1", port, "")
        opened = [mux.open(_req(f"r{i}")) for i in range(20)]     # one burst: one connection
        outs = await asyncio.gather(*(_drain(q) for _, q in opened))
        a, b = mux.open(_req("x")), mux.open(_req("x"))             # ids stay unique on the stream
        assert (a[0], b[0]) == ("x", "x.1")
        assert [await _drain(a[1]), await _drain(b[1])] == [list(range(5))] * 2
        assert len(conns) == 1 and not mux.queues
        conns[0].transport.abort()                                 # the worker goes away mid-request
        mux.tcp = None                                             # (no stream to fall back to here)
        await mux.close()
        server.close()
        return outs
    assert asyncio.run(go()) == [list(range(5))] * 20


def test_a_replaced_link_never_takes_the_next_ones_requests():
    """A flush the old link had scheduled, run after the link broke and a new one took
    over, leaves the waiting starts to the new link (they were once silently dropped)."""
    async def go():
        server, port, conns = await _echo_worker(2)
        mux = DecodeMux(stub=None, address=f"127.0.0.1:{port}")
        mux.tcp = ("127.0.0.1", port, "")
        assert await _drain(mux.open(_req("a"))[1]) == [0, 1]
        old = mux._link
        old.proto.transport.abort()                    # the connection breaks ...
        await asyncio.sleep(0.05)
        assert mux._link is None
        rid, q = mux.open(_req("b"))                   # ... the next request opens a new link
        old._flush()                                   # and the old link's late flush runs
        assert mux._starts and mux._starts[0].request_id == "b"
        out = await asyncio.wait_for(_drain(q), 5)
        await mux.close()
        server.close()
        return out
    assert asyncio.run(go()) == [0, 1]


def test_a_broken_framed_stream_fails_every_request_on_it():
    async def go():
        server, port, conns = await _echo_worker(0)                # never answers
        mux = DecodeMux(stub=None, address=f"127.0.0.1:{port}")
        mux.tcp = ("127.0.0.1", port, "")
        qs = [mux.open(_req(f"r{i}"))[1] for i in range(3)]
        while not conns:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        conns[0].transport.abort()
        outs = await asyncio.wait_for(asyncio.gather(*(_drain(q) for q in qs)), 5)
        server.close()
        return outs, mux
    outs, mux = asyncio.run(go())
    for o in outs:
        assert len(o) == 1 and isinstance(o[0], WorkerCallError) and o[0].code() == grpc.StatusCode.UNAVAILABLE
    assert not mux.queues and mux._link is None


class _FakeCall:
    """grpc.aio's stream-stream call, as DecodeMux's gRPC link uses it."""

    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    async def write(self, msg):
        for r in msg.start:
            self.q.put_nowait(worker_pb2.DecodeStreamBatch(updates=[worker_pb2.DecodeUpdate(
                request_id=r.request_id, token_ids=[7], finish_reason="length")]))

    def cancel(self):
        self.q.put_nowait(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        b = await self.q.get()
        if b is None:
            raise StopAsyncIteration
        return b


class _FakeStub:
    def __init__(self):
        self.calls = 0

    def DecodeStream(self):
        self.calls += 1
        return _FakeCall()


def test_an_unreachable_framed_port_falls_back_to_grpc(caplog):
    async def go():
        import socket
        with socket.socket() as s:                 # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        stub = _FakeStub()
        mux = DecodeMux(stub, "127.0.0.1:1")
        mux.tcp = ("127.0.0.1", port, "")
        out = await asyncio.wait_for(asyncio.gather(*(_drain(mux.open(_req(f"r{i}"))[1]) for i in range(3))), 5)
        await mux.close()
        return out, stub, mux
    out, stub, mux = asyncio.run(go())
    assert out == [[7]] * 3 and stub.calls == 1 and mux.tcp is None
    assert "using gRPC DecodeStream" in caplog.text
