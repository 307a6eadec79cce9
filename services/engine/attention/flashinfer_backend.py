"""FlashInfer backend (used when the flashinfer package imports).

tests/gpu runs it where the package imports: flashinfer-python 0.6.18.post1
(JIT-built for sm_90a) on an H100 gives the greedy ids of transformers on
SmolLM2-135M-Instruct and the Llama-3.2-1B, Qwen2.5-0.5B and SmolLM2 shapes in
bf16, chunked prefill, prefix-cache hits and CUDA graphs on and off
(benchmarks/results/gpu_h100.md). It has no fp32 kernels.

Page tables come from the runner's PagedBatch (host copy), turned into
FlashInfer's CSR form (indptr, indices, last_page_len) once per forward, and
`plan()` runs then, not per layer. K/V are stored with the Triton store_kv
kernel (the pool layout [pages * page_size, KVH, D] is FlashInfer's NHD
[pages, page_size, KVH, D] viewed flat).

CUDA graphs, as SGLang does them: each decode bucket gets its own decode
wrapper in CUDA-graph mode, on fixed index buffers (one indices buffer shared
by all buckets, as one graph replays at a time), planned with a dummy batch
before its capture and with the step's batch before each replay
(`prepare_replay`): the graph reads the plan from the wrapper's buffers. The
piecewise graphs need nothing: their attention runs eagerly between pieces.

A mixed step (decodes first, then prefill chunks) runs its decode rows on the
decode kernel and only the rest on the prefill kernel, as vLLM does: the prefill
kernel on the decode rows made Llama-3.2-1B's mixed steps 3x as slow (27.6 s
against 9.1 s for a run's 611 on an H100).

plan() fills the wrapper's pinned host buffer and copies it to the device on
the stream; with the overlap scheduler the host plans step N+1 while step N
runs, so a plan first waits for that wrapper's previous copy (an event per
wrapper), before it rewrites the buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import AttentionBackend, PagedBatch, register_backend
from .triton_backend import kernel_ops

# The float workspace (split-KV partial outputs), SGLang's size: decode on tensor cores in
# CUDA-graph mode always splits, and at batch 512 a 7B model with a group of 7 needs ~160 MiB.
WORKSPACE_BYTES = 384 * 2**20
# Each CUDA-graph decode wrapper allocates its own int workspace (plan data) of this size.
GRAPH_WRAPPER_BYTES = 8 * 2**20


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
    page_table = np.asarray(page_table)
    indices = page_table[np.arange(page_table.shape[1]) < npages[:, None]].astype(np.int32)   # row by row
    last = (seq_lens - (npages - 1) * page_size).astype(np.int32)
    return indptr, indices, last


@dataclass
class FlashInferMeta:
    """The planned wrappers of one forward: the decode wrapper for its first num_decode
    rows (one token each), the prefill wrapper for the ext_rows after them."""
    decode: Any = None
    num_decode: int = 0
    prefill: Any = None
    ext_rows: int = 0


@register_backend("flashinfer")
class FlashInferAttentionBackend(AttentionBackend):
    paged = True
    graph_capturable = True
    host_page_table = True

    def __init__(self, kv_pool, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim)
        try:
            import flashinfer
        except ImportError as e:
            raise ImportError("attention_backend 'flashinfer' needs the flashinfer package "
                              f"(pip install flashinfer-python): {e}") from e
        self.fi = flashinfer
        dev = kv_pool.device
        self.ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)     # zeroed before first use
        # the plain decode kernel has query groups of 1-4, 6 and 8 only; larger groups (Qwen2.5's
        # 7) read K/V once per group on tensor cores instead, as SGLang does
        self.tensor_cores = num_heads // num_kv_heads > 4
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.ws, "NHD",
                                                                     use_tensor_cores=self.tensor_cores)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.ws, "NHD")
        self._graph: dict[int, Any] = {}        # decode bucket -> its CUDA-graph wrapper
        self._graph_bufs: tuple[torch.Tensor, ...] | None = None
        self._planned: dict[int, torch.cuda.Event] = {}     # wrapper -> its last plan's copy queued
        self.ops = kernel_ops(dev)
        self.ps = kv_pool.page_size

    @classmethod
    def graph_bytes(cls, num_buckets: int) -> int:
        return num_buckets * GRAPH_WRAPPER_BYTES

    def build_paged(self, batch: PagedBatch) -> FlashInferMeta:
        """A mixed step's decode rows go to the decode kernel, as in a pure decode step, and
        only its other rows to the prefill kernel."""
        h, nd = batch.host, batch.num_decode
        meta = FlashInferMeta(num_decode=nd)
        if nd:
            self._plan_decode(self._decode, h["page_table"][:nd], h["seq_lens"][:nd])
            meta.decode = self._decode
        if not batch.is_decode:
            indptr, indices, last = self._csr(h["page_table"][nd:], h["seq_lens"][nd:])
            qo = h["ext_q_start"]
            self._plan(self._prefill, torch.from_numpy(qo.astype(np.int32)), indptr, indices, last, causal=True)
            meta.prefill, meta.ext_rows = self._prefill, int(qo[-1])
        return meta

    def graph_meta(self, batch: PagedBatch) -> FlashInferMeta:
        """A decode bucket's wrapper in CUDA-graph mode, planned on a dummy batch (every row
        one token of page 0); the largest bucket comes first and sizes the shared buffers."""
        bs, max_pages = batch.page_table.shape
        if self._graph_bufs is None:
            i32 = dict(dtype=torch.int32, device=self.kv_pool.device)
            self._graph_bufs = (torch.zeros(bs + 1, **i32), torch.zeros(bs * max_pages, **i32),
                                torch.ones(bs, **i32))
        if bs not in self._graph:
            indptr, indices, last = self._graph_bufs
            self._graph[bs] = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.ws, "NHD", use_cuda_graph=True, use_tensor_cores=self.tensor_cores,
                paged_kv_indptr_buffer=indptr[:bs + 1], paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last[:bs])
        w = self._graph[bs]
        self._plan_decode(w, np.zeros((bs, 1), np.int32), np.ones(bs, np.int32))
        return FlashInferMeta(w, bs)

    def prepare_replay(self, batch: PagedBatch) -> None:
        h = batch.host
        self._plan_decode(self._graph[len(h["seq_lens"])], h["page_table"], h["seq_lens"])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_slots: torch.Tensor | None, meta: FlashInferMeta,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """out_slots None: k and v are in the pool already. out: where to write the result
        [T, H * D] (the piecewise graphs' static buffer)."""
        kc, vc = self.kv_pool.k_cache[layer], self.kv_pool.v_cache[layer]
        if out_slots is not None:
            self.ops.store_kv(k, v, kc, vc, out_slots)
        paged = (kc.view(-1, self.ps, *kc.shape[1:]), vc.view(-1, self.ps, *vc.shape[1:]))
        q = q.contiguous()
        o = torch.empty_like(q) if out is None else out.view(q.shape)
        nd, ne = meta.num_decode, meta.ext_rows
        if meta.decode is not None:
            meta.decode.run(q[:nd], paged, out=o[:nd])
        if meta.prefill is not None:        # rows past nd + ne: padding (piecewise graphs)
            meta.prefill.run(q[nd:nd + ne], paged, out=o[nd:nd + ne])
        return o.view(q.shape[0], -1)

    # -- planning ----------------------------------------------------------------------------------
    def _heads(self) -> tuple[int, int, int, int]:
        return self.num_heads, self.num_kv_heads, self.head_dim, self.ps

    def _csr(self, page_table: np.ndarray, seq_lens: np.ndarray):
        indptr, indices, last = (torch.from_numpy(a) for a in paged_csr(page_table, seq_lens, self.ps))
        return indptr, indices.to(self.kv_pool.device, non_blocking=True), last

    def _plan_decode(self, wrapper, page_table: np.ndarray, seq_lens: np.ndarray) -> None:
        self._plan(wrapper, *self._csr(page_table, seq_lens), pos_encoding_mode="NONE")

    def _plan(self, wrapper, *layout, **kw) -> None:
        """wrapper.plan(), once its previous plan has been copied from its pinned buffer (plan()
        rewrites that buffer, and the copy is queued behind the GPU work of the step before)."""
        ev = self._planned.get(id(wrapper))
        if ev is not None:
            ev.synchronize()
        dtype = self.kv_pool.dtype
        wrapper.plan(*layout, *self._heads(), sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype, **kw)
        if self.kv_pool.device.type == "cuda":
            self._planned.setdefault(id(wrapper), torch.cuda.Event()).record()
