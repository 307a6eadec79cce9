"""The workers a gateway knows: connection, health, KV events into the index, load.

Each worker gets one long-lived task: Info (role, model, page size, the
tokenizer), then a KvEvents subscription whose snapshot replaces whatever the
index held for that worker, then every event in seq order. A gap in the seqs
resubscribes (a fresh snapshot); a broken stream means the worker is gone: it
leaves the index at once and is retried with backoff.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import grpc

from services.common.grpc_utils import CHANNEL_OPTIONS
from tandem.v1 import worker_pb2, worker_pb2_grpc

from .decode_mux import DecodeMux
from .index import GlobalIndex

log = logging.getLogger("tandem.gateway")

_STORED, _REMOVED, _CLEARED = worker_pb2.KvEvent.STORED, worker_pb2.KvEvent.REMOVED, worker_pb2.KvEvent.CLEARED


@dataclass
class WorkerState:
    """What routing reads about one worker (gateway-side counters, no RPC)."""
    address: str
    role: str = ""
    model: str = ""
    page_size: int = 16
    healthy: bool = False
    prefill_tokens: int = 0       # uncached prompt tokens routed here, not yet prefilled
    running: int = 0              # decode streams open on it

    @property
    def can_prefill(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")


class Worker:
    def __init__(self, address: str, index: GlobalIndex,
                 on_info: Callable[["Worker", worker_pb2.InfoResponse], "asyncio.Future | None"],
                 retry_s: float = 0.5, framed: bool = True):
        self.state = WorkerState(address)
        self.index = index
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.decoder = DecodeMux(self.stub, address)    # every request decoded here, one stream
        self.info: worker_pb2.InfoResponse | None = None
        self._on_info = on_info
        self._retry_s = retry_s
        self._framed = framed         # decode over the worker's framed TCP stream when it offers one
        self._task: asyncio.Task | None = None
        self.resyncs = 0

    @property
    def address(self) -> str:
        return self.state.address

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker {self.address}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.decoder.close()
        self._down()
        await self.channel.close()

    def _down(self) -> None:
        if self.state.healthy:
            log.warning("worker %s is down; dropped from the index", self.address)
        self.state.healthy = False
        self.index.clear(self.address)

    async def _run(self) -> None:
        while True:
            try:
                await self._subscribe()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if self.state.healthy or e.code() != grpc.StatusCode.UNAVAILABLE:
                    log.info("worker %s: %s %s", self.address, e.code().name, e.details())
            except Exception:
                log.exception("worker %s: subscription failed", self.address)
            self._down()
            await asyncio.sleep(self._retry_s)

    async def _subscribe(self) -> None:
        info = await self.stub.Info(worker_pb2.InfoRequest(), timeout=5)
        if not info.ready:
            log.info("worker %s is draining; not routing to it", self.address)
            return
        if self.info is None or self.info.worker_id != info.worker_id:
            pending = self._on_info(self, info)
            if pending is not None:
                await pending
        self.info = info
        port = info.decode_stream_port if self._framed else 0
        self.decoder.tcp = (self.address.rsplit(":", 1)[0].strip("[]"), port, info.worker_id) if port else None
        st = self.state
        st.role, st.model, st.page_size = info.role, info.model, info.page_size or 16
        last = None
        async for batch in self.stub.KvEvents(worker_pb2.KvEventsRequest()):
            if batch.snapshot:
                self.index.clear(self.address)
                self._apply(batch.events)
                last = batch.seq
                if not st.healthy:
                    log.warning("worker %s (%s, %s) is up; %d pages in its cache", self.address, st.role,
                                st.model, self.index.num_pages(self.address))
                st.healthy = True
                continue
            if last is None or batch.first_seq != last + 1:
                self.resyncs += 1
                log.warning("worker %s: KV events jumped from %s to %d; resyncing", self.address, last,
                            batch.first_seq)
                return
            self._apply(batch.events)
            last = batch.seq

    def _apply(self, events) -> None:
        addr, index = self.address, self.index
        for e in events:
            if e.kind == _STORED:
                index.apply_stored(addr, e.page_hashes, e.parent_hash if e.HasField("parent_hash") else None)
            elif e.kind == _REMOVED:
                index.apply_removed(addr, e.page_hashes)
            else:
                index.clear(addr)
