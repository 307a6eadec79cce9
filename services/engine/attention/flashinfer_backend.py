"""FlashInfer backend (used when the flashinfer package imports).

tests/gpu runs it where the package imports: flashinfer-python 0.6.18.post1
(JIT-built for sm_90a) on an H100 gave the greedy ids of transformers on the
Llama-3.2-1B and Qwen2.5-0.5B shapes in bf16, chunked prefill and a prefix-cache
hit included (benchmarks/results/gpu_h100.md). It has no fp32 kernels.

Page tables come from the runner's PagedBatch (host copy), turned into
FlashInfer's CSR form (indptr, indices, last_page_len) once per forward, and
`plan()` runs then, not per layer. K/V are stored with the Triton store_kv
kernel (the pool layout [pages * page_size, KVH, D] is FlashInfer's NHD
[pages, page_size, KVH, D] viewed flat). plan() syncs with the host, so
decode batches run eagerly (no CUDA graphs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import AttentionBackend, PagedBatch, register_backend
from .triton_backend import kernel_ops

WORKSPACE_BYTES = 128 * 2**20


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def paged_csr(page_table: np.ndarray, seq_lens: np.ndarray, page_size: int):
    """FlashInfer's CSR page layout from a [B, max_pages] page table: int32 indptr [B + 1],
    the pages each sequence uses, concatenated, and how full each last page is (1..page_size)."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    npages = -(-seq_lens // page_size)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    indices = np.concatenate([row[:n] for row, n in zip(page_table, npages)] or [np.zeros(0)]).astype(np.int32)
    last = (seq_lens - (npages - 1) * page_size).astype(np.int32)
    return indptr, indices, last


@dataclass
class FlashInferMeta:
    wrapper: Any        # the planned decode or prefill wrapper


@register_backend("flashinfer")
class FlashInferAttentionBackend(AttentionBackend):
    paged = True
    graph_capturable = False
    host_page_table = True

    def __init__(self, kv_pool, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim)
        try:
            import flashinfer
        except ImportError as e:
            raise ImportError("attention_backend 'flashinfer' needs the flashinfer package "
                              f"(pip install flashinfer-python): {e}") from e
        dev = kv_pool.device
        ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        # the plain decode kernel has query groups of 1-4, 6 and 8 only; larger groups (Qwen2.5's
        # 7) read K/V once per group on tensor cores instead, as SGLang does
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "NHD", use_tensor_cores=num_heads // num_kv_heads > 4)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        self.ops = kernel_ops(dev)
        self.ps = kv_pool.page_size

    def build_paged(self, batch: PagedBatch) -> FlashInferMeta:
        h = batch.host
        ps, dev, dtype = self.ps, self.kv_pool.device, self.kv_pool.dtype
        indptr, indices, last = (torch.from_numpy(a) for a in paged_csr(h["page_table"], h["seq_lens"], ps))
        indices = indices.to(dev, non_blocking=True)
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, ps)
        if batch.is_decode:
            self._decode.plan(indptr, indices, last, *heads, pos_encoding_mode="NONE",
                              q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)
            return FlashInferMeta(self._decode)
        qo = torch.from_numpy(h["q_start"].astype(np.int32))
        self._prefill.plan(qo, indptr, indices, last, *heads, causal=True, sm_scale=self.scale,
                           q_data_type=dtype, kv_data_type=dtype)
        return FlashInferMeta(self._prefill)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_slots: torch.Tensor, meta: FlashInferMeta) -> torch.Tensor:
        kc, vc = self.kv_pool.k_cache[layer], self.kv_pool.v_cache[layer]
        self.ops.store_kv(k, v, kc, vc, out_slots)
        paged = (kc.view(-1, self.ps, *kc.shape[1:]), vc.view(-1, self.ps, *vc.shape[1:]))
        return meta.wrapper.run(q.contiguous(), paged).view(q.shape[0], -1)
