"""KV transfer between workers behind one interface (base.TransferBackend).

Backends: `grpc` (the KV rides in the Prefill response stream; CPU default).
CUDA IPC, NCCL and NIXL plug into the same registry.
"""
from .base import KvLayout, TransferBackend, TransferError, get_backend, register_backend, backend_names
from . import grpc_stream  # noqa: F401  (registers "grpc")

__all__ = ["KvLayout", "TransferBackend", "TransferError", "get_backend", "register_backend", "backend_names"]
