#!/usr/bin/env python3
"""The floor of a Python gateway: the least one can do between loadgen and a fake worker.

uvicorn (httptools, uvloop) with a bare ASGI app for POST /generate; each
request goes to one fake Tandem worker over its framed TCP decode stream (the
transport `tandem gateway` uses) with fixed prompt ids, and every token comes
back as one SSE event in /generate's shape. No tokenizer, no detokenizer, no
routing, no validation, no metrics. What it adds over a direct connection to a
worker is what any Python gateway on uvicorn would add on this machine, before
doing any of a gateway's work; gateway_overhead.sh measures it as the target
`relay`.

    python benchmarks/relay_floor.py --worker 127.0.0.1:18461 --port 18500
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys

import grpc
import uvicorn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from services.common.framed import FramedProtocol  # noqa: E402
from services.common.grpc_utils import install_uvloop  # noqa: E402
from services.gateway.decode_mux import Inbox  # noqa: E402
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402

PROMPT = list(range(100, 136))          # loadgen.py's prompt is ~36 tokens


class Relay:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.inboxes: dict[str, Inbox] = {}
        self.ids = itertools.count()
        self.conn: FramedProtocol | None = None

    def _dispatch(self, batch) -> None:
        for u in batch.updates:
            q = self.inboxes.get(u.request_id)
            if q is not None:
                q.put(u)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/generate":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            return await send({"type": "http.response.body", "body": b"ok"})
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        n = json.loads(body)["sampling_params"]["max_new_tokens"]
        if self.conn is None or self.conn.closed:
            self.conn = FramedProtocol(worker_pb2.DecodeStreamBatch.FromString, self._dispatch,
                                       lambda why: None, server=False)
            await asyncio.get_running_loop().create_connection(lambda: self.conn, self.host, self.port)
        rid = str(next(self.ids))
        q = self.inboxes[rid] = Inbox()
        self.conn.send(worker_pb2.DecodeStreamRequest(start=[worker_pb2.DecodeRequest(
            request_id=rid, prompt_ids=PROMPT, sampling=common_pb2.SamplingParams(max_new_tokens=n))]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        out: list[int] = []
        try:
            while True:
                ups = await q.take()
                events = []
                for u in ups:
                    for t in u.token_ids:
                        out.append(t)
                        events.append(b"data: %s\n\n" % json.dumps({"text": "", "output_ids": out}).encode())
                if ups[-1].finish_reason:
                    events.append(b"data: [DONE]\n\n")
                    return await send({"type": "http.response.body", "body": b"".join(events), "more_body": False})
                await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
        finally:
            del self.inboxes[rid]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", required=True, help="a fake Tandem worker's gRPC HOST:PORT (Info names its stream)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    install_uvloop()

    async def stream_port() -> int:
        async with grpc.aio.insecure_channel(a.worker) as ch:
            return (await worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), timeout=10)).decode_stream_port
    port = asyncio.run(stream_port())
    if not port:
        sys.exit(f"relay_floor: {a.worker} offers no framed decode stream")
    relay = Relay(a.worker.rsplit(":", 1)[0], port)
    uvicorn.run(relay, host=a.host, port=a.port, http="httptools", loop="none", lifespan="off",
                access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
