"""What one message costs on loopback here: grpc.aio against the framed stream, and a hop
between processes.

1. A one-message ping-pong over a bidirectional stream, both ends in this process
   (one event loop, uvloop): Worker.DecodeStream on grpc.aio, then the same messages
   over services/common/framed.py. The gap is grpc.aio's poller-thread hand-offs.
2. A hop between two processes: the time of a send() to a peer asleep in epoll, and
   of a round trip around a 300 us sleep on the other side (what the wake-ups add).

    python benchmarks/micro/loopback_hops.py [-n 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import statistics
import sys
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from services.common.framed import FramedProtocol  # noqa: E402
from services.common.grpc_utils import install_uvloop  # noqa: E402
from tandem.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

REQ = worker_pb2.DecodeStreamRequest(start=[worker_pb2.DecodeRequest(request_id="x", prompt_ids=list(range(20)))])
ANSWER = worker_pb2.DecodeStreamBatch(updates=[worker_pb2.DecodeUpdate(request_id="x", token_ids=[1])])


def _p(ts: list[float]) -> str:
    s = sorted(ts)
    return f"p50 {1e6 * statistics.median(s):.1f} us, p90 {1e6 * s[int(0.9 * len(s))]:.1f} us"


async def grpc_pingpong(n: int) -> str:
    class Servicer(worker_pb2_grpc.WorkerServicer):
        async def DecodeStream(self, it, ctx):
            async for _ in it:
                yield ANSWER
    srv = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(Servicer(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = worker_pb2_grpc.WorkerStub(ch).DecodeStream()
        it, ts = call.__aiter__(), []
        for _ in range(n):
            t = time.perf_counter()
            await call.write(REQ)
            await it.__anext__()
            ts.append(time.perf_counter() - t)
        call.cancel()
    await srv.stop(None)
    return _p(ts)


async def framed_pingpong(n: int) -> str:
    loop = asyncio.get_running_loop()

    def server_proto():
        p = FramedProtocol(worker_pb2.DecodeStreamRequest.FromString, lambda m: p.send(ANSWER),
                           lambda why: None, server=True)
        return p
    srv = await loop.create_server(server_proto, "127.0.0.1", 0)
    got: asyncio.Queue = asyncio.Queue()
    client = FramedProtocol(worker_pb2.DecodeStreamBatch.FromString, got.put_nowait, lambda why: None, server=False)
    await loop.create_connection(lambda: client, "127.0.0.1", srv.sockets[0].getsockname()[1])
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        client.send(REQ)
        await got.get()
        ts.append(time.perf_counter() - t)
    client.close()
    srv.close()
    return _p(ts)


def process_hop(n: int) -> str:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pid = os.fork()
    if pid == 0:                                   # the peer: wake, sleep 300 us, answer
        a.close()
        ep = select.epoll()
        ep.register(b.fileno(), select.EPOLLIN)
        while True:
            ep.poll()
            if not b.recv(100):
                os._exit(0)
            time.sleep(0.0003)
            b.send(b"y")
    b.close()
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    sends, trips = [], []
    for _ in range(n):
        t = time.perf_counter()
        a.send(b"x")
        t1 = time.perf_counter()
        ep.poll()
        a.recv(10)
        sends.append(t1 - t)
        trips.append(time.perf_counter() - t)
    a.close()
    os.waitpid(pid, 0)
    return f"send to a sleeping peer {_p(sends)}; round trip around a 300 us sleep {_p(trips)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000)
    a = ap.parse_args()
    install_uvloop()
    print(f"grpc.aio DecodeStream ping-pong:   {asyncio.run(grpc_pingpong(a.n))}")
    print(f"framed DecodeStream ping-pong:     {asyncio.run(framed_pingpong(a.n))}")
    print(f"between processes: {process_hop(a.n)}")


if __name__ == "__main__":
    main()
