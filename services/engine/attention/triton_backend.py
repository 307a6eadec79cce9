"""Triton backend: paged attention read in place from the KV pool (kernels/triton).

Metadata is the runner's PagedBatch as is (page table, lengths, q offsets,
uploaded once per step); per layer a forward is store_kv, then
decode_attention over the leading sequences that have one new token (all of
a decode batch) and extend_attention over the rest (prefill and extend
chunks). A decode row never goes through extend: that kernel's q blocks are
128 rows and its programs are per q head, so a single row there would read
its K/V once per head and waste the tensor cores on padding. No host syncs, so a decode forward can be
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
        # Decode splits the context by the longest one the engine allows, not the batch's: a
        # captured graph (whose page table is that wide) and an eager forward of the same
        # batch size then split alike, and give the same floats.
        self.context_pages = kv_pool.num_pages

    def build_paged(self, batch: PagedBatch) -> TritonMeta:
        if batch.num_decode == 0 or self.kv_pool.device.type != "cuda":
            return TritonMeta(batch)
        from kernels.triton.decode import default_num_splits
        return TritonMeta(batch, default_num_splits(batch.num_decode, self.num_kv_heads, self.context_pages,
                                                    self.ps, self.kv_pool.device))

    def fused_kv_store(self, layer: int, v: torch.Tensor, out_slots: torch.Tensor) -> tuple | None:
        """The rotary kernel's KV-store arguments (on CUDA: the CPU fallback rotates apart)."""
        if self.kv_pool.device.type != "cuda":
            return None
        return v, self.kv_pool.k_cache[layer], self.kv_pool.v_cache[layer], out_slots

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                out_slots: torch.Tensor | None, meta: TritonMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        """out_slots None: k and v are in the pool already (fused_kv_store). out: where to
        write the result [T, H * D] (the piecewise graphs' static buffer)."""
        kc, vc = self.kv_pool.k_cache[layer], self.kv_pool.v_cache[layer]
        if out_slots is not None:
            self.ops.store_kv(k, v, kc, vc, out_slots)
        b, nd = meta.batch, meta.batch.num_decode
        o = torch.empty_like(q) if out is None else out.view(q.shape)
        if nd == b.seq_lens.shape[0]:
            self.ops.decode_attention(q, kc, vc, b.page_table, b.seq_lens, self.ps, self.scale, out=o,
                                      num_splits=meta.num_splits)
            return o.view(q.shape[0], -1)
        if nd:
            self.ops.decode_attention(q[:nd], kc, vc, b.page_table[:nd], b.seq_lens[:nd], self.ps, self.scale,
                                      out=o[:nd], num_splits=meta.num_splits)
        self.ops.extend_attention(q[nd:], kc, vc, b.page_table[nd:], b.ext_q_start, b.prefix_lens[nd:],
                                  b.seq_lens[nd:], self.ps, self.scale, b.ext_max_q_len, out=o[nd:])
        return o.view(q.shape[0], -1)
