"""The interface every KV transfer backend implements, and their registry.

A transfer moves the KV of prompt positions [start, n) from the prefill
worker's pool to pages the decode worker reserved. The decode worker names the
backend and its destination in a TransferDescriptor (inside PrefillRequest);
the prefill worker hands the exported KV to `send`, which either yields inline
chunks for the Prefill stream (the `grpc` backend) or writes to the
destination itself and yields nothing (device backends). The decode worker
passes inline chunks to `receive`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import torch

from tandem.v1 import kv_pb2

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TransferError(RuntimeError):
    """A transfer that cannot go on (bad chunk, wrong layout, lost peer)."""


@dataclass(frozen=True)
class KvLayout:
    """The shape of one token's KV in a pool: [num_layers, 2, num_kv_heads, head_dim]."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * DTYPES[self.dtype].itemsize


class TransferBackend(ABC):
    name: str = ""

    def __init__(self, layout: KvLayout, chunk_bytes: int = 4 << 20):
        self.layout = layout
        self.chunk_bytes = chunk_bytes

    def descriptor(self, reservation: object = None) -> kv_pb2.TransferDescriptor:
        """Decode side: what the prefill worker needs to reach the reserved pages."""
        return kv_pb2.TransferDescriptor(backend=self.name, chunk_bytes=self.chunk_bytes)

    @abstractmethod
    def send(self, kv: torch.Tensor, start: int, desc: kv_pb2.TransferDescriptor) -> Iterator[kv_pb2.KvChunk]:
        """Prefill side: move kv (KVPool.gather layout) of positions [start, start + len(kv))."""

    @abstractmethod
    def receive(self, chunk: kv_pb2.KvChunk) -> tuple[int, torch.Tensor]:
        """Decode side: (start position, kv) of one inline chunk."""


_BACKENDS: dict[str, type[TransferBackend]] = {}


def register_backend(cls: type[TransferBackend]) -> type[TransferBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str, layout: KvLayout, **kwargs) -> TransferBackend:
    if name not in _BACKENDS:
        raise ValueError(f"transfer backend {name!r} is unknown (known: {', '.join(backend_names())})")
    return _BACKENDS[name](layout, **kwargs)
