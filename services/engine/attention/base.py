"""Attention backend contract and registry.

A backend stores each new token's K/V into the paged pool and computes
attention of the new tokens over everything the sequence has cached.

Contract:
- `build(seqs)` runs once per forward (not per layer) and returns metadata;
  `seqs` lists, in batch order, each sequence's cached length `start`, its
  number of new tokens `n` (the new tokens are contiguous in the flattened
  batch, in this order) and `slots`, a 1-D int64 tensor of the KV slots of
  positions [0, start + n).
- `forward(layer, q, k, v, out_slots, meta)` gets q [T, H, D] and k, v
  [T, KVH, D] of the new tokens, writes k, v at `out_slots` of `layer`, and
  returns the attention output [T, H * D]. Attention is causal: token i of a
  sequence sees positions [0, start + i].
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class SeqSpec:
    start: int
    n: int
    slots: torch.Tensor


class AttentionBackend(ABC):
    def __init__(self, kv_pool: Any, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv_pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    @abstractmethod
    def build(self, seqs: Sequence[SeqSpec]) -> Any: ...

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_slots: torch.Tensor, meta: Any) -> torch.Tensor: ...


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def deco(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        ATTENTION_BACKENDS[name] = cls
        return cls
    return deco


def get_backend(name: str) -> type[AttentionBackend]:
    from . import cpu_backend, torch_backend  # noqa: F401  (register "cpu", "torch")
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {name!r} is unknown (known: {sorted(ATTENTION_BACKENDS)})")
    return ATTENTION_BACKENDS[name]


def default_backend(device: torch.device) -> str:
    """auto: the C++ kernels on a CPU that has them, else the torch reference."""
    if device.type == "cpu":
        from kernels import cpu as cpu_kernels
        return "cpu" if cpu_kernels.available() else "torch"
    return "torch"
