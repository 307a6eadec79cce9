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
- `fused_kv_store(layer, v, out_slots)`: a backend whose pool the rotary kernel
  can write (triton on CUDA) returns that kernel's store arguments; the model
  then rotates and stores in one kernel and calls forward with out_slots None
  (stored already). The others return None.

Paged backends (`paged = True`: triton, flashinfer) get `build_paged(batch)`
instead of `build(seqs)`: the runner uploads the whole step (ids, positions,
slots, page table, lengths) in one host->device copy and hands them a
`PagedBatch` of device tensors, with no per-sequence slot tensors. Their
`forward` must not sync with the host; with `graph_capturable` it must also
be capturable by a CUDA graph with the PagedBatch's tensors as static inputs:
a decode graph's metadata comes from `graph_meta(batch)` (its static batch),
built before the capture and outside it, and `prepare_replay(batch)` gets each
step's batch (padded to the graph's size, host arrays included) before the
replay, for backends whose graphs read plan data that the host writes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class SeqSpec:
    start: int
    n: int
    slots: torch.Tensor


@dataclass
class PagedBatch:
    """One forward's sequences in paged form. Tensors live on the model's device;
    `host` holds the same arrays as numpy (for backends that plan on the CPU)."""
    page_table: torch.Tensor       # int32 [B, P]: page ids of positions [0, seq_len); past them: unread ids
    seq_lens: torch.Tensor         # int32 [B]: tokens in the cache after this forward
    prefix_lens: torch.Tensor      # int32 [B]: tokens cached before it (seq_len - new tokens)
    q_start: torch.Tensor          # int32 [B + 1]: first row of each sequence's new tokens in [T]
    max_q_len: int                 # most new tokens of one sequence (1: a pure decode batch)
    host: dict[str, Any] = field(default_factory=dict)
    # The first num_decode sequences have one new token each (the scheduler puts decodes
    # first); ext_q_start [B - num_decode + 1] and ext_max_q_len describe the rest alone.
    num_decode: int = 0
    ext_q_start: torch.Tensor | None = None
    ext_max_q_len: int = 0

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1


class AttentionBackend(ABC):
    paged = False                  # True: build_paged(PagedBatch) instead of build(seqs)
    graph_capturable = False       # forward can run inside a CUDA graph (decode batches)
    host_page_table = False        # build_paged reads batch.host["page_table"] (numpy)

    def __init__(self, kv_pool: Any, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv_pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def build(self, seqs: Sequence[SeqSpec]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} builds from a PagedBatch (paged = True)")

    def build_paged(self, batch: PagedBatch) -> Any:
        raise NotImplementedError(f"{type(self).__name__} builds from SeqSpecs (paged = False)")

    @classmethod
    def graph_bytes(cls, num_buckets: int) -> int:
        """GPU bytes the backend allocates for its decode graphs beyond their activations
        (kept free beside the KV pool)."""
        return 0

    def graph_meta(self, batch: PagedBatch) -> Any:
        """Metadata of a decode graph's static batch (built once, outside the capture)."""
        return self.build_paged(batch)

    def prepare_replay(self, batch: PagedBatch) -> None:
        """Before a decode graph replays this step's batch (nothing: the graph reads the batch's
        tensors, which the runner has copied into its static inputs)."""

    def fused_kv_store(self, layer: int, v: torch.Tensor, out_slots: torch.Tensor) -> tuple | None:
        return None

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_slots: torch.Tensor | None, meta: Any) -> torch.Tensor: ...


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def deco(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        ATTENTION_BACKENDS[name] = cls
        return cls
    return deco


def get_backend(name: str) -> type[AttentionBackend]:
    # registers "cpu", "torch", "triton", "flashinfer" (the last two import their kernels lazily)
    from . import cpu_backend, flashinfer_backend, torch_backend, triton_backend  # noqa: F401
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {name!r} is unknown (known: {sorted(ATTENTION_BACKENDS)})")
    return ATTENTION_BACKENDS[name]


def default_backend(device: torch.device) -> str:
    """auto: triton on CUDA when Triton imports, the C++ kernels on a CPU that has
    them, else the torch reference."""
    if device.type == "cpu":
        from kernels import cpu as cpu_kernels
        return "cpu" if cpu_kernels.available() else "torch"
    if device.type == "cuda":
        from .triton_backend import triton_available
        return "triton" if triton_available() else "torch"
    return "torch"
