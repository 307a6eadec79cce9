"""The Worker gRPC service: routes each RPC to its role's handler."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from services.decode.service import decode
from services.decode.stream import decode_stream
from services.prefill.service import prefill
from services.transfer import backend_names
from tandem.v1 import worker_pb2, worker_pb2_grpc

from .convert import events_to_proto
from .state import WorkerState


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, state: WorkerState, model_name: str):
        self.w = state
        self.model_name = model_name

    async def Decode(self, request, context):
        await decode(self.w, request, context)

    async def DecodeStream(self, request_iterator, context):
        await decode_stream(self.w, request_iterator, context)

    async def Prefill(self, request, context):
        await prefill(self.w, request, context)

    async def Abort(self, request, context):
        found = await self.w.loop.call(self.w.loop.engine.abort, request.request_id)
        return worker_pb2.AbortResponse(found=found)

    def _load(self) -> worker_pb2.WorkerLoad:
        running, waiting, usage = self.w.loop.engine.load()
        return worker_pb2.WorkerLoad(running=running, waiting=waiting, kv_usage=usage)

    async def Load(self, request, context):
        return worker_pb2.LoadResponse(load=self._load())

    async def Info(self, request, context):
        engine = self.w.loop.engine
        tok_json, tok_cfg = _tokenizer_strings(engine.tokenizer)
        return worker_pb2.InfoResponse(
            worker_id=self.w.worker_id, role=self.w.role, model=self.model_name,
            context_length=engine.context_len, vocab_size=engine.model_config.vocab_size,
            page_size=engine.kv.ps, eos_token_ids=engine.eos_token_ids,
            tokenizer_json=tok_json, tokenizer_config_json=tok_cfg, load=self._load(),
            transfer_backends=backend_names(), ready=not self.w.draining,
            decode_stream_port=self.w.decode_stream_port)

    async def KvEvents(self, request, context):
        """A snapshot of the prefix cache, then every change, in seq order."""
        loop = self.w.loop
        q: asyncio.Queue = asyncio.Queue()
        loop.subscribers.add(q)
        try:
            seq, snap = await loop.call(_snapshot, loop.engine)
            await context.write(worker_pb2.KvEventBatch(
                snapshot=True, seq=seq, first_seq=seq, events=events_to_proto(snap),
                load=self._load(), worker_id=self.w.worker_id))
            last = seq
            while True:
                events = await q.get()
                if events is None:              # draining: end the stream
                    return
                while not q.empty():
                    more = q.get_nowait()
                    if more is None:
                        return
                    events = events + more
                events = [e for e in events if e.seq > last]
                if not events:
                    continue
                await context.write(worker_pb2.KvEventBatch(
                    seq=events[-1].seq, first_seq=events[0].seq, events=events_to_proto(events),
                    worker_id=self.w.worker_id))
                last = events[-1].seq
        finally:
            loop.subscribers.discard(q)


def _snapshot(engine):
    cache = engine.kv.cache
    return cache.snapshot() if cache is not None else (0, [])


def _tokenizer_strings(tok) -> tuple[str, str]:
    if tok is None:
        return "", ""
    if hasattr(tok, "tokenizer_json"):
        return tok.tokenizer_json, tok.tokenizer_config_json
    folder = Path(tok.hf.name_or_path)
    cfg = folder / "tokenizer_config.json"
    return (folder / "tokenizer.json").read_text(), cfg.read_text() if cfg.is_file() else "{}"
