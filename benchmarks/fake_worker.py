#!/usr/bin/env python3
"""Fake Tandem worker: the `tandem.v1.Worker` gRPC service with no model.

A benchmark fixture. It answers a gateway the way a real worker would, but
makes its tokens up, as fast as it can, so that what a gateway in front of it
costs (latency, CPU per token) can be measured on its own:

  Info      worker_id (random per start), role, model name, context_length
            8192, vocab_size and the tokenizer files of --tokenizer, page_size
            16, no EOS ids, transfer_backends ["grpc"], ready.
  Decode    sampling.max_new_tokens (default 16) canned token ids, one per
            DecodeResponse, no sleeps; the last message carries finish_reason
            "length" and the usage. prefill_address is ignored.
  DecodeStream  (what the gateway uses; also over framed TCP on a free port
            named in Info.decode_stream_port, unless --no-framed) a fake engine loop per stream: each
            "step" gives every running request its next canned id, then
            yields to the event loop (--step-ms 0, the default: no sleeps) or
            sleeps --step-ms; one writer sends all that is pending as one
            DecodeStreamBatch, so a batch holds one token per request per step
            the transport took, as with a real worker.
  Prefill   one PrefillResponse(result=PrefillResult(token_id, 0, 0)).
  KvEvents  one empty snapshot batch (seq 0), then the stream stays open,
            silent, until the caller cancels it.
  Abort     found=False.      Load: zeros.
  grpc.health.v1.Health: SERVING (overall and "tandem.v1.Worker").

The Decode messages are serialized once, at start-up (one per canned id) or
on the first request of a given (max_new_tokens, prompt length) (the last
one), so the worker spends as little CPU per token as grpc allows.

    python benchmarks/fake_worker.py --port 50061 [--role both] [--tokenizer DIR]

--port 0 picks a free port. One line, "fake_worker listening on HOST:PORT
...", is printed to stdout once the server is up.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from services.common.framed import FramedProtocol  # noqa: E402
from tandem.v1 import common_pb2, worker_pb2  # noqa: E402

DEFAULT_TOKENIZER = os.path.expanduser("~/.cache/tandem/models/smollm2-135m-instruct")
# Short common words; each that the tokenizer keeps as one token is used.
WORDS = [" the", " of", " and", " to", " a", " in", " is", " it", " that", " for",
         " on", " with", " as", " was", " be", " at"]
DEFAULT_MAX_NEW_TOKENS = 16
SERVICE = "tandem.v1.Worker"


def tokenizer_files(path: str) -> tuple[str, str, str]:
    """(tokenizer.json path, its text, tokenizer_config.json text or "")."""
    if os.path.isdir(path):
        tok_path = os.path.join(path, "tokenizer.json")
        cfg_path = os.path.join(path, "tokenizer_config.json")
    else:
        tok_path = path
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    with open(tok_path, encoding="utf-8") as f:
        tok_json = f.read()
    cfg_json = ""
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg_json = f.read()
    return tok_path, tok_json, cfg_json


def canned_ids(tok: Tokenizer) -> list[int]:
    ids = []
    for w in WORDS:
        enc = tok.encode(w, add_special_tokens=False).ids
        if len(enc) == 1:
            ids.append(enc[0])
    if not ids:  # an unusual tokenizer: any ids that are not special tokens
        special = set(tok.get_added_tokens_decoder())
        ids = [i for i in range(min(tok.get_vocab_size(), 1000)) if i not in special][-16:]
    return ids


class FakeWorker:
    def __init__(self, role: str, model: str, tok_path: str, tok_json: str, cfg_json: str,
                 step_ms: float = 0.0):
        self.step_s = step_ms / 1000
        tok = Tokenizer.from_str(tok_json)
        self.worker_id = uuid.uuid4().hex[:16]
        self.ids = canned_ids(tok)
        self.info = worker_pb2.InfoResponse(
            worker_id=self.worker_id, role=role, model=model, context_length=8192,
            vocab_size=tok.get_vocab_size(with_added_tokens=True), page_size=16,
            eos_token_ids=[], tokenizer_json=tok_json, tokenizer_config_json=cfg_json,
            load=worker_pb2.WorkerLoad(), transfer_backends=["grpc"], ready=True)
        # Decode: every message but the last is one of these, pre-serialized.
        self.token_msgs = [worker_pb2.DecodeResponse(token_ids=[i]).SerializeToString()
                           for i in self.ids]
        self.last_msgs: dict[tuple[int, int], bytes] = {}
        self.prefill_msg = worker_pb2.PrefillResponse(
            result=worker_pb2.PrefillResult(token_id=self.ids[0], cached_tokens=0,
                                            sent_tokens=0))
        self.snapshot = worker_pb2.KvEventBatch(snapshot=True, seq=0, first_seq=0,
                                                load=worker_pb2.WorkerLoad(),
                                                worker_id=self.worker_id)
        self.running = 0

    def _last(self, n: int, prompt_len: int) -> bytes:
        key = (n, prompt_len)
        msg = self.last_msgs.get(key)
        if msg is None:
            ids = [self.ids[(n - 1) % len(self.ids)]] if n > 0 else []
            msg = worker_pb2.DecodeResponse(
                token_ids=ids, finish_reason="length",
                usage=common_pb2.Usage(prompt_tokens=prompt_len, completion_tokens=n,
                                       cached_tokens=0)).SerializeToString()
            if len(self.last_msgs) < 4096:
                self.last_msgs[key] = msg
        return msg

    # Decode yields bytes: its handler has no response serializer.
    async def Decode(self, request, context):
        sp = request.sampling
        n = sp.max_new_tokens if sp.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        msgs = self.token_msgs
        k = len(msgs)
        self.running += 1
        try:
            for i in range(n - 1):
                yield msgs[i % k]
            yield self._last(n, len(request.prompt_ids))
        finally:
            self.running -= 1

    async def DecodeStream(self, request_iterator, context):
        s = _FakeStream(self, context.write)

        async def read():
            async for msg in request_iterator:
                s.on_message(msg)

        reader = asyncio.create_task(read())
        try:
            await s.run()
        finally:
            reader.cancel()

    async def Prefill(self, request, context):
        yield self.prefill_msg

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=False)

    async def KvEvents(self, request, context):
        yield self.snapshot
        await asyncio.get_running_loop().create_future()  # until cancelled

    async def Info(self, request, context):
        return self.info

    async def Load(self, request, context):
        return worker_pb2.LoadResponse(load=worker_pb2.WorkerLoad())


class _FakeStream:
    """One DecodeStream, whatever carries it: a fake engine loop (each "step" gives
    every running request its next canned id, then yields or sleeps --step-ms) and
    one writer that sends all that is pending as one DecodeStreamBatch."""

    def __init__(self, w: FakeWorker, send):
        self.w, self.send = w, send
        self.running: dict[str, list[int]] = {}     # rid -> [tokens left, tokens made, prompt length]
        self.pending: dict[str, worker_pb2.DecodeUpdate] = {}
        self.work, self.flush = asyncio.Event(), asyncio.Event()

    def on_message(self, msg) -> None:
        for r in msg.start:
            sp = r.sampling
            n = sp.max_new_tokens if sp.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
            self.running[r.request_id] = [n, 0, len(r.prompt_ids)]
        for rid in msg.cancel:
            self.running.pop(rid, None)
            self.pending.pop(rid, None)
        self.work.set()

    async def _engine(self) -> None:
        ids, k, running, pending = self.w.ids, len(self.w.ids), self.running, self.pending
        while True:
            if not running:
                self.work.clear()
                await self.work.wait()
            for rid, st in list(running.items()):
                u = pending.get(rid)
                if u is None:
                    u = pending[rid] = worker_pb2.DecodeUpdate(request_id=rid)
                u.token_ids.append(ids[st[1] % k])
                st[0] -= 1
                st[1] += 1
                if st[0] <= 0:
                    u.finish_reason = "length"
                    u.usage.prompt_tokens, u.usage.completion_tokens = st[2], st[1]
                    del running[rid]
            self.flush.set()
            await asyncio.sleep(self.w.step_s)

    async def run(self) -> None:
        engine = asyncio.create_task(self._engine())
        self.w.running += 1
        try:
            while True:
                await self.flush.wait()
                self.flush.clear()
                if self.pending:
                    batch = worker_pb2.DecodeStreamBatch(updates=self.pending.values())
                    self.pending.clear()
                    await self.send(batch)
        finally:
            self.w.running -= 1
            engine.cancel()


def framed_connection(w: FakeWorker) -> FramedProtocol:
    """DecodeStream over framed TCP (services/common/framed.py), as a real worker serves it."""
    async def send(batch):
        proto.send(batch)
        await proto.drain()

    s = _FakeStream(w, send)
    task = asyncio.get_running_loop().create_task(s.run())
    proto = FramedProtocol(worker_pb2.DecodeStreamRequest.FromString, s.on_message, lambda why: task.cancel(),
                           server=True, identity=w.worker_id)
    return proto


def add_worker(server, w: FakeWorker) -> None:
    """The generated add_WorkerServicer_to_server, except that Decode's
    responses go out as the bytes the servicer yields."""
    W = worker_pb2
    handlers = {
        "Decode": grpc.unary_stream_rpc_method_handler(
            w.Decode, request_deserializer=W.DecodeRequest.FromString,
            response_serializer=None),
        "DecodeStream": grpc.stream_stream_rpc_method_handler(
            w.DecodeStream, request_deserializer=W.DecodeStreamRequest.FromString,
            response_serializer=W.DecodeStreamBatch.SerializeToString),
        "Prefill": grpc.unary_stream_rpc_method_handler(
            w.Prefill, request_deserializer=W.PrefillRequest.FromString,
            response_serializer=W.PrefillResponse.SerializeToString),
        "Abort": grpc.unary_unary_rpc_method_handler(
            w.Abort, request_deserializer=W.AbortRequest.FromString,
            response_serializer=W.AbortResponse.SerializeToString),
        "KvEvents": grpc.unary_stream_rpc_method_handler(
            w.KvEvents, request_deserializer=W.KvEventsRequest.FromString,
            response_serializer=W.KvEventBatch.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            w.Info, request_deserializer=W.InfoRequest.FromString,
            response_serializer=W.InfoResponse.SerializeToString),
        "Load": grpc.unary_unary_rpc_method_handler(
            w.Load, request_deserializer=W.LoadRequest.FromString,
            response_serializer=W.LoadResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)


async def serve(a) -> None:
    tok_path, tok_json, cfg_json = tokenizer_files(a.tokenizer)
    w = FakeWorker(a.role, a.model_name, tok_path, tok_json, cfg_json, a.step_ms)
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),              # a busy port is an error, not a shared one
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
    ])
    add_worker(server, w)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("%s:%d" % (a.host, a.port))
    if not port:
        sys.exit("fake_worker: cannot listen on %s:%d" % (a.host, a.port))
    if not a.no_framed:
        framed = await asyncio.get_running_loop().create_server(lambda: framed_connection(w), a.host, 0)
        w.info.decode_stream_port = framed.sockets[0].getsockname()[1]
    await server.start()
    for name in ("", SERVICE):
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    print("fake_worker listening on %s:%d role=%s model=%s worker_id=%s decode_stream_port=%d ids=%s"
          % (a.host, port, a.role, a.model_name, w.worker_id, w.info.decode_stream_port, w.ids), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="0: any free port")
    ap.add_argument("--role", choices=["prefill", "decode", "both"], default="both")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help="a folder with tokenizer.json (and tokenizer_config.json), "
                         "or a tokenizer.json (default: %(default)s)")
    ap.add_argument("--model-name", default="fake-model")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="DecodeStream: time per fake engine step (0: none, yield only)")
    ap.add_argument("--no-framed", action="store_true",
                    help="do not serve DecodeStream over framed TCP (gateways then use gRPC)")
    a = ap.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(serve(a))
    else:
        asyncio.run(serve(a))


if __name__ == "__main__":
    main()
