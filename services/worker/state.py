"""What the role handlers share inside one worker process."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import grpc

from services.common.grpc_utils import CHANNEL_OPTIONS
from services.transfer import TransferBackend
from tandem.v1 import worker_pb2_grpc

from .engine_loop import EngineLoop


@dataclass
class WorkerState:
    loop: EngineLoop
    role: str
    transfer: TransferBackend
    worker_id: str = field(default_factory=lambda: os.urandom(6).hex())
    prefill_timeout_s: float = 60.0         # a Prefill call (compute + transfer) that takes longer fails
    draining: bool = False
    streams: set = field(default_factory=set)   # open DecodeStreams (woken when a drain starts)
    decode_stream_port: int = 0             # framed-TCP DecodeStream's port (Info); 0: not served
    _peers: dict[str, worker_pb2_grpc.WorkerStub] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def peer(self, address: str) -> worker_pb2_grpc.WorkerStub:
        """A stub to another worker (one channel per address, reused)."""
        stub = self._peers.get(address)
        if stub is None:
            stub = worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
            self._peers[address] = stub
        return stub

    def new_rid(self) -> str:
        return f"{self.worker_id}-{next(self._ids)}"
