"""The `grpc` backend: KV rides inline in the Prefill response stream.

The prefill worker cuts the KV into chunks of at most `chunk_bytes` (whole
tokens, a few MB) and the stream's HTTP/2 flow control gives backpressure: the
prefill worker writes the next chunk only when the decode worker has taken the
last one. Works on any machine (CPU default); the bytes go through host memory.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import torch

from tandem.v1 import kv_pb2

from .base import DTYPES, KvLayout, TransferBackend, TransferError, register_backend

_AS_BYTES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@register_backend
class GrpcStreamTransfer(TransferBackend):
    name = "grpc"

    def send(self, kv: torch.Tensor, start: int, desc: kv_pb2.TransferDescriptor) -> Iterator[kv_pb2.KvChunk]:
        lay = self.layout
        limit = desc.chunk_bytes or self.chunk_bytes
        per_chunk = max(1, limit // lay.bytes_per_token)
        kv = kv.to("cpu", DTYPES[lay.dtype]).contiguous()
        for i in range(0, kv.shape[0], per_chunk):
            part = kv[i:i + per_chunk]
            yield kv_pb2.KvChunk(start=start + i, num_tokens=part.shape[0], num_layers=lay.num_layers,
                                 num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, dtype=lay.dtype,
                                 data=part.view(_AS_BYTES[part.dtype]).numpy().tobytes())

    def receive(self, chunk: kv_pb2.KvChunk) -> tuple[int, torch.Tensor]:
        lay = self.layout
        got = (chunk.num_layers, chunk.num_kv_heads, chunk.head_dim)
        want = (lay.num_layers, lay.num_kv_heads, lay.head_dim)
        if got != want:
            raise TransferError(f"KV chunk layout (layers, kv heads, head dim) {got} differs from this pool's {want}")
        dtype = DTYPES.get(chunk.dtype)
        if dtype is None:
            raise TransferError(f"KV chunk dtype {chunk.dtype!r} is unknown")
        shape = (chunk.num_tokens, lay.num_layers, 2, lay.num_kv_heads, lay.head_dim)
        if len(chunk.data) != dtype.itemsize * shape[0] * shape[1] * shape[2] * shape[3] * shape[4]:
            raise TransferError(f"KV chunk of {len(chunk.data)} bytes does not hold {chunk.num_tokens} tokens")
        with warnings.catch_warnings():     # read-only buffer: the tensor is only read (copied into the pool)
            warnings.simplefilter("ignore", UserWarning)
            kv = torch.frombuffer(chunk.data, dtype=dtype).view(shape)
        return chunk.start, kv
