"""Triton backend: paged attention read in place from the KV pool (kernels/triton).

Metadata is the runner's PagedBatch as is (page table, lengths, q offsets,
uploaded once per step); per layer a forward is store_kv, then
decode_attention for a pure decode batch (one new token per sequence) or
extend_attention for anything else (prefill, extend, a decode row of a mixed
batch is an extend of one token). No host syncs, so a decode forward can be
captured in a CUDA graph (services/engine/cuda_graph.py).

On a device without Triton (CPU tests) the same calls go to the kernels'
torch references, which take the same arguments.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from .base import AttentionBackend, PagedBatch, register_backend


@functools.cache
def triton_available() -> bool:
    """Triton imports and kernels/triton is there (a CUDA device is checked by the caller)."""
    try:
        import triton  # noqa: F401
        from kernels import triton as _  # noqa: F401
    except Exception:                     # ImportError, or a broken Triton install
        return False
    return True


def kernel_ops(device: torch.device) -> ModuleType:
    """The Triton kernels on CUDA; their torch references elsewhere (same signatures)."""
    if device.type == "cuda":
        from kernels import triton as tk
        return tk
    from kernels.triton import reference
    return reference


@dataclass
class TritonMeta:
    batch: PagedBatch
    num_splits: int | None = None       # decode: context splits (fixed per captured graph)


@register_backend("triton")
class TritonAttentionBackend(AttentionBackend):
    paged = True
    graph_capturable = True

    def __init__(self, kv_pool, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim)
        self.ops = kernel_ops(kv_pool.device)
        self.ps = kv_pool.page_size

    def build_paged(self, batch: PagedBatch) -> TritonMeta:
        return TritonMeta(batch)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_slots: torch.Tensor, meta: TritonMeta) -> torch.Tensor:
        kc, vc = self.kv_pool.k_cache[layer], self.kv_pool.v_cache[layer]
        self.ops.store_kv(k, v, kc, vc, out_slots)
        b = meta.batch
        if b.is_decode:
            o = self.ops.decode_attention(q, kc, vc, b.page_table, b.seq_lens, self.ps, self.scale,
                                          num_splits=meta.num_splits)
        else:
            o = self.ops.extend_attention(q, kc, vc, b.page_table, b.q_start, b.prefix_lens, b.seq_lens,
                                          self.ps, self.scale, b.max_q_len)
        return o.view(q.shape[0], -1)
