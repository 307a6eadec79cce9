"""The flashinfer backend's wiring, on CPU, against a stand-in flashinfer module that
records what the backend asks of it (the kernels themselves run in tests/gpu): the CSR
page layout it plans each step with, one CUDA-graph wrapper per decode bucket on shared
index buffers, planned before capture and again before each replay, and where the
attention output goes."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from services.engine.attention.base import PagedBatch, get_backend
from services.engine.attention.flashinfer_backend import paged_csr
from services.engine.kv_pool import KVPool


class _Wrapper:
    def __init__(self, ws, layout, use_cuda_graph=False, use_tensor_cores=False, **bufs):
        self.layout, self.graph, self.tensor_cores, self.bufs, self.plans = layout, use_cuda_graph, use_tensor_cores, bufs, []

    def plan(self, *args, **kw):
        self.plans.append((args, kw))

    def run(self, q, paged, out=None):      # fills its rows with its mark: which kernel wrote them
        self.ran = q.shape[0]
        return torch.full_like(q, self.mark) if out is None else out.fill_(self.mark)


@pytest.fixture
def fi(monkeypatch):
    mod = types.ModuleType("flashinfer")
    mod.BatchDecodeWithPagedKVCacheWrapper = type("Decode", (_Wrapper,), {"mark": 1.0})
    mod.BatchPrefillWithPagedKVCacheWrapper = type("Prefill", (_Wrapper,), {"mark": 2.0})
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    return mod


def _backend(heads=4, kv_heads=2, ps=4):
    pool = KVPool(16, ps, 2, kv_heads, 8, torch.float32, "cpu")
    return get_backend("flashinfer")(pool, heads, kv_heads, 8)


def _batch(table, seq_lens, q_start, max_q_len, num_decode=None):
    t = torch.from_numpy(np.asarray(table, np.int32))
    n = len(seq_lens)
    nd = (n if max_q_len == 1 else 0) if num_decode is None else num_decode
    q_start = np.asarray(q_start, np.int32)
    host = {"page_table": np.asarray(table, np.int32), "seq_lens": np.asarray(seq_lens, np.int32),
            "q_start": q_start, "ext_q_start": q_start[nd:] - nd}
    return PagedBatch(t, torch.tensor(seq_lens, dtype=torch.int32), torch.zeros(n, dtype=torch.int32),
                      torch.from_numpy(q_start), max_q_len, host, num_decode=nd)


def test_flashinfer_paged_csr():
    """Only the pages a sequence's length uses, and the last page's fill (a full last page
    counts page_size, not 0)."""
    table = np.array([[7, 3, 9, 0], [5, 0, 0, 0], [1, 2, 4, 6]], dtype=np.int32)
    indptr, indices, last = paged_csr(table, np.array([9, 4, 13]), 4)
    assert indptr.tolist() == [0, 3, 4, 8] and indptr.dtype == np.int32
    assert indices.tolist() == [7, 3, 9, 5, 1, 2, 4, 6] and indices.dtype == np.int32
    assert last.tolist() == [1, 4, 1] and last.dtype == np.int32


def test_eager_steps_plan_decode_or_prefill(fi):
    be = _backend()
    dec = be.build_paged(_batch([[3, 5], [6, 0]], [6, 2], [0, 1, 2], 1))
    assert dec.decode is be._decode and dec.prefill is None and not be._decode.graph
    (indptr, indices, last, *heads), kw = be._decode.plans[-1]
    assert indptr.tolist() == [0, 2, 3] and indices.tolist() == [3, 5, 6] and last.tolist() == [2, 2]
    assert tuple(heads) == (4, 2, 8, 4) and kw["sm_scale"] == pytest.approx(8 ** -0.5)
    pre = be.build_paged(_batch([[3, 5], [6, 0]], [7, 3], [0, 1, 4], 3))
    assert pre.prefill is be._prefill and pre.decode is None and pre.ext_rows == 4
    (qo, *_), kw = be._prefill.plans[-1]
    assert qo.tolist() == [0, 1, 4] and kw["causal"] is True


def test_mixed_step_decode_rows_on_the_decode_kernel(fi):
    """Decodes first, then prefill chunks: the decode wrapper plans and runs the first rows,
    the prefill wrapper the rest (its query offsets from 0); padded rows are left alone."""
    be = _backend()
    meta = be.build_paged(_batch([[3, 5], [6, 0], [7, 8]], [6, 2, 7], [0, 1, 2, 5], 3, num_decode=2))
    assert meta.decode is be._decode and meta.prefill is be._prefill and (meta.num_decode, meta.ext_rows) == (2, 3)
    (indptr, indices, last, *_), _ = be._decode.plans[-1]
    assert indptr.tolist() == [0, 2, 3] and indices.tolist() == [3, 5, 6] and last.tolist() == [2, 2]
    (qo, indptr, indices, last, *_), _ = be._prefill.plans[-1]
    assert qo.tolist() == [0, 3] and indptr.tolist() == [0, 2] and indices.tolist() == [7, 8] and last.tolist() == [3]
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    out = torch.zeros(6, 32)                # 5 rows and one of padding
    be.forward(0, q, k, v, None, meta, out=out)
    assert be._decode.ran == 2 and be._prefill.ran == 3
    assert out[:2].eq(1.0).all() and out[2:5].eq(2.0).all() and out[5].eq(0.0).all()


def test_graph_bytes_kept_free():
    """Each CUDA-graph decode wrapper's own plan buffer is reserved beside the KV pool."""
    assert get_backend("flashinfer").graph_bytes(3) == 3 * 8 * 2**20
    assert get_backend("triton").graph_bytes(3) == 0


def test_tensor_cores_for_large_query_groups(fi):
    assert not _backend(heads=8, kv_heads=2)._decode.tensor_cores      # group 4: the plain kernel
    assert _backend(heads=14, kv_heads=2)._decode.tensor_cores         # group 7: it has none


def test_graph_wrappers_per_bucket_share_buffers(fi):
    """Largest bucket first: it sizes the shared buffers; each bucket's wrapper is planned
    on a dummy batch before capture, and on the step's own batch before each replay."""
    be = _backend()
    metas = {bs: be.graph_meta(_batch(np.zeros((bs, 3), np.int32), [1] * bs, list(range(bs + 1)), 1))
             for bs in (8, 4, 1)}
    w8, w4 = metas[8].decode, metas[4].decode
    assert w8.graph and w4.graph and w8 is not w4 and be._graph == {8: w8, 4: w4, 1: metas[1].decode}
    assert w8.bufs["paged_kv_indices_buffer"] is w4.bufs["paged_kv_indices_buffer"]
    assert w8.bufs["paged_kv_indices_buffer"].numel() == 8 * 3
    assert w4.bufs["paged_kv_indptr_buffer"].numel() == 5 and w4.bufs["paged_kv_last_page_len_buffer"].numel() == 4
    (indptr, indices, last, *_), _ = w4.plans[-1]
    assert indptr.tolist() == [0, 1, 2, 3, 4] and indices.tolist() == [0] * 4 and last.tolist() == [1] * 4
    assert be.graph_meta(_batch(np.zeros((4, 3), np.int32), [1] * 4, list(range(5)), 1)).decode is w4
    n = len(w4.plans)
    be.prepare_replay(_batch([[2, 3, 0], [4, 0, 0], [0, 0, 0], [0, 0, 0]], [5, 1, 1, 1], list(range(5)), 1))
    assert len(w4.plans) == n + 1 and len(w8.plans) == 1
    (indptr, indices, last, *_), _ = w4.plans[-1]
    assert indptr.tolist() == [0, 2, 3, 4, 5] and indices.tolist() == [2, 3, 4, 0, 0] and last.tolist() == [1, 1, 1, 1]


def test_forward_stores_kv_and_writes_out(fi):
    """K/V land in the pool at out_slots; the output goes to `out` when given (the piecewise
    graphs' static buffer)."""
    be = _backend()
    meta = be.build_paged(_batch([[1], [2]], [1, 1], [0, 1, 2], 1))
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    o = be.forward(0, q, k, v, torch.tensor([4, 8]), meta)
    assert o.shape == (2, 32)
    assert torch.equal(be.kv_pool.k_cache[0][4], k[0]) and torch.equal(be.kv_pool.v_cache[0][8], v[1])
    out = torch.zeros(2, 32)
    assert be.forward(1, q, k, v, None, meta, out=out).data_ptr() == out.data_ptr()
    assert out.eq(1.0).all()
