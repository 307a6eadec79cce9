"""The triton attention backend's metadata and dispatch, on CPU in fp32.

Off CUDA the backend calls the kernels' torch references (kernels/triton/
reference.py) with the same arguments as the Triton kernels, so what is
tested here is the engine side: the runner's one-upload step arrays (page
table, lengths, q offsets, slots), decode vs extend dispatch, the padding of
decode batches to a CUDA-graph bucket (replayed eagerly on the same static
buffers), and greedy ids equal to the torch backend and to transformers.
"""
from __future__ import annotations

import numpy as np
import pytest

from services.engine.attention.base import ATTENTION_BACKENDS, PagedBatch, default_backend, get_backend
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.cuda_graph import DecodeGraphs, graph_buckets
from services.engine.engine import Engine
from services.engine.request import Request
from services.engine.runner import StepArrays
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Chunk
from tests.reference import Reference, assert_greedy_equal, make_tiny_checkpoint
from tests.unit.test_engine_greedy import prompts

FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        folder = make_tiny_checkpoint(fam, tmp_path_factory.mktemp(fam))
        out[fam] = (folder, Reference(folder))
    return out


def make(folder, backend="triton", page_size=4, chunk=32, tokens=4096, max_running=64) -> Engine:
    eng = Engine(EngineConfig(model=str(folder), dtype="float32", device="cpu", attention_backend=backend,
                               cache=CacheConfig(page_size=page_size, max_total_tokens=tokens),
                               scheduler=SchedulerConfig(chunked_prefill_size=chunk,
                                                         max_running_requests=max_running)))
    # The reference decode_attention reads a batch's K/V padded to its longest sequence and
    # masks the scores only, so never-written slots (torch.empty) can bring NaN in through
    # 0 * NaN; the Triton kernel masks its loads. Zeroed pools keep these tests deterministic.
    for t in (*eng.kv.pool.k_cache, *eng.kv.pool.v_cache):
        t.zero_()
    return eng


def greedy(eng: Engine, ps, n=10) -> list[list[int]]:
    res = eng.generate(ps, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
    eng.check_integrity()
    return [r.output_ids for r in res]


def _req(prompt_len: int, out: list[int], pages: list[int]) -> Request:
    r = Request("r", list(range(100, 100 + prompt_len)), SamplingParams())
    r.output_ids, r.pages = list(out), list(pages)
    return r


def test_registry_and_defaults():
    assert get_backend("triton").paged and get_backend("torch")
    assert {"torch", "cpu", "triton", "flashinfer"} <= set(ATTENTION_BACKENDS)
    assert get_backend("triton").paged and get_backend("triton").graph_capturable
    assert get_backend("flashinfer").paged and not get_backend("flashinfer").graph_capturable
    import torch
    assert default_backend(torch.device("cpu")) in ("cpu", "torch")
    assert graph_buckets(256)[:6] == [1, 2, 4, 8, 16, 24] and graph_buckets(256)[-1] == 256
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20] and graph_buckets(1) == [1]


def test_step_arrays_mixed_batch():
    ps = 4
    a = _req(10, [7, 8], [5, 9, 2])          # decode: 12 tokens, position 11 -> page 2 (id 2), offset 3
    b = _req(9, [], [3, 6, 4])               # extend: positions 4..8 of 9, prefix 4
    c = _req(6, [], [11, 12])                # prefill chunk that does not sample: positions 0..2
    chunks = (Chunk(a, 11, 1, True), Chunk(b, 4, 5, True), Chunk(c, 0, 3, False))
    s = StepArrays.build(chunks, ps)
    x = s.arrays
    assert s.max_q_len == 5 and not s.all_sample
    assert x["input_ids"].tolist() == [8, *range(104, 109), 100, 101, 102]
    assert x["positions"].tolist() == [11, 4, 5, 6, 7, 8, 0, 1, 2]
    assert x["out_slots"].tolist() == [2 * 4 + 3, 6 * 4, 6 * 4 + 1, 6 * 4 + 2, 6 * 4 + 3, 4 * 4, 11 * 4, 11 * 4 + 1,
                                       11 * 4 + 2]
    assert x["page_table"].tolist() == [[5, 9, 2], [3, 6, 4], [11, 0, 0]]
    assert x["seq_lens"].tolist() == [12, 9, 3] and x["prefix_lens"].tolist() == [11, 4, 0]
    assert x["q_start"].tolist() == [0, 1, 6, 9] and x["sample_rows"].tolist() == [0, 5]
    assert s.num_decode == 1 and x["ext_q_start"].tolist() == [0, 5, 8] and s.ext_max_q_len == 5
    assert {k: v.dtype for k, v in x.items()} == {
        "input_ids": np.int32, "positions": np.int64, "out_slots": np.int64, "page_table": np.int32,
        "seq_lens": np.int32, "prefix_lens": np.int32, "q_start": np.int32, "sample_rows": np.int64,
        "ext_q_start": np.int32}


def test_step_arrays_decode_padding():
    chunks = (Chunk(_req(5, [1], [3, 7]), 5, 1, True), Chunk(_req(2, [4], [9]), 2, 1, True))
    s = StepArrays.build(chunks, 4)
    assert s.max_q_len == 1 and s.all_sample and s.num_decode == 2
    p = s.padded(4).arrays
    assert p["out_slots"].tolist() == [7 * 4 + 1, 9 * 4 + 2, -1, -1]
    assert p["seq_lens"].tolist() == [6, 3, 1, 1] and p["page_table"].tolist() == [[3, 7], [9, 0], [0, 0], [0, 0]]
    assert p["q_start"].tolist() == [0, 1, 2, 3, 4] and p["sample_rows"].tolist() == [0, 1]
    assert s.padded(2) is s


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_equals_torch_backend(tiny, family, page_size):
    folder, ref = tiny[family]
    ps = prompts(1, [5, 17, 40, 64, 3, 33])
    base = prompts(2, [80])[0]
    cached = [base, base[:70] + [5, 6, 7]]             # the second one hits the first's prefix
    want = greedy(make(folder, "torch", page_size), ps) + greedy(make(folder, "torch", page_size), cached)
    eng = make(folder, "triton", page_size)            # chunk 32: prompts over 32 tokens are chunked
    assert type(eng.runner.backend).__name__ == "TritonAttentionBackend"
    got = greedy(eng, ps) + greedy(eng, cached)
    assert eng.generate([cached[1]], SamplingParams(max_new_tokens=1))[0].num_cached_prompt >= 64
    for i, (p, g) in enumerate(zip(ps + cached, got)):
        r, gaps = ref.greedy(p, 10)
        assert_greedy_equal(g, r, gaps, f"{family} triton prompt {i}")
    assert got == want


def test_decode_padded_to_graph_buckets(tiny):
    """Decode batches padded to buckets (3 -> 4, 5 -> 8, ...) on the graphs' static buffers,
    replayed eagerly: the same ids as unpadded."""
    folder, _ = tiny["llama"]
    ps = prompts(3, [9, 14, 30, 3, 22])
    want = greedy(make(folder), ps, 12)
    eng = make(folder)
    r = eng.runner
    r.graphs = DecodeGraphs(r.model, r.backend, 4, eng.context_len // 4, eng.device, use_graphs=False)
    calls = []
    replay = r.graphs.replay
    r.graphs.replay = lambda dev, b: calls.append((dev["seq_lens"].shape[0], b)) or replay(dev, b)
    assert greedy(eng, ps, 12) == want
    assert (4, 3) in calls or (4, 4) in calls
    assert all(bs in (1, 2, 4) and b <= bs for bs, b in calls)


def test_pool_fills_up(tiny):
    """A pool far smaller than the workload: requests wait and are retracted, all finish
    with the ids of a roomy pool."""
    folder, _ = tiny["qwen2"]
    ps = prompts(4, [30, 45, 20, 60, 38, 51])
    want = greedy(make(folder, tokens=4096), ps, 40)
    eng = make(folder, tokens=160, chunk=64)
    assert greedy(eng, ps, 40) == want
    assert eng.scheduler.num_retractions > 0


def test_paged_batch_is_decode():
    import torch
    z = torch.zeros(1, dtype=torch.int32)
    assert PagedBatch(z[None], z, z, z, 1).is_decode and not PagedBatch(z[None], z, z, z, 3).is_decode


def test_uploader_packs_one_buffer():
    import torch
    from services.engine.runner import Uploader
    up = Uploader(torch.device("cpu"))
    a = {"x": np.arange(5, dtype=np.int32), "e": np.zeros(0, np.int64), "t": np.arange(6, dtype=np.int32).reshape(2, 3),
         "y": np.array([-1, 2**40], np.int64)}
    for _ in range(3):                                   # both host buffers, reused
        got = up.upload(a)
        assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in a.items()}
        assert got["y"].dtype == torch.int64 and got["t"].shape == (2, 3)
        assert got["x"].untyped_storage().data_ptr() == got["y"].untyped_storage().data_ptr()
