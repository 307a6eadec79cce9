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
import torch

from services.engine.attention.base import ATTENTION_BACKENDS, PagedBatch, default_backend, get_backend
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.cuda_graph import DecodeGraphs, graph_buckets, route_buckets
from services.engine.piecewise_graph import PiecewiseGraphs, token_buckets
from services.engine.engine import Engine
from services.engine.request import Request
from services.engine.page_table import PageTable
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
    assert get_backend("flashinfer").paged and get_backend("flashinfer").graph_capturable
    import torch
    assert default_backend(torch.device("cpu")) in ("cpu", "torch")
    assert graph_buckets(256)[:6] == [1, 2, 4, 8, 16, 24] and graph_buckets(256)[-1] == 256
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20] and graph_buckets(1) == [1]
    assert graph_buckets(512)[34:37] == [256, 272, 288] and graph_buckets(512)[-1] == 512
    assert graph_buckets(300)[-3:] == [272, 288, 300] and len(set(graph_buckets(512))) == len(graph_buckets(512))


def _device_table(table: PageTable, s: StepArrays) -> list[list[int]]:
    """The batch's page table as the runner gets it: new entries written, rows gathered."""
    x = {k: torch.from_numpy(v) for k, v in s.arrays.items()}
    table.apply(x["pt_index"], x["pt_pages"])
    return table.gather(x["rows"], s.width).tolist()


def test_step_arrays_mixed_batch():
    ps = 4
    a = _req(10, [7, 8], [5, 9, 2])          # decode: 12 tokens, position 11 -> page 2 (id 2), offset 3
    b = _req(9, [], [3, 6, 4])               # extend: positions 4..8 of 9, prefix 4
    c = _req(6, [], [11, 12])                # prefill chunk that does not sample: positions 0..2
    chunks = (Chunk(a, 11, 1, True), Chunk(b, 4, 5, True), Chunk(c, 0, 3, False))
    table = PageTable(torch.device("cpu"), rows=4, cols=2)   # grows to 4+ rows, 3+ columns
    s = StepArrays.build(chunks, ps, table, host_table=True)
    x = s.arrays
    assert s.max_q_len == 5 and not s.all_sample and not s.has_futures
    assert x["input_ids"].tolist() == [8, *range(104, 109), 100, 101, 102]
    assert x["positions"].tolist() == [11, 4, 5, 6, 7, 8, 0, 1, 2]
    assert x["out_slots"].tolist() == [2 * 4 + 3, 6 * 4, 6 * 4 + 1, 6 * 4 + 2, 6 * 4 + 3, 4 * 4, 11 * 4, 11 * 4 + 1,
                                       11 * 4 + 2]
    assert _device_table(table, s) == [[5, 9, 2], [3, 6, 4], [11, 0, 0]] == s.host_table.tolist()
    assert len(set(x["rows"].tolist()) | {0}) == 4 and len(x["pt_pages"]) == 7
    assert x["seq_lens"].tolist() == [12, 9, 3] and x["prefix_lens"].tolist() == [11, 4, 0]
    assert x["q_start"].tolist() == [0, 1, 6, 9] and x["sample_rows"].tolist() == [0, 5]
    assert s.num_decode == 1 and x["ext_q_start"].tolist() == [0, 5, 8] and s.ext_max_q_len == 5
    assert {k: v.dtype for k, v in x.items()} == {
        "input_ids": np.int32, "positions": np.int64, "out_slots": np.int64, "rows": np.int32,
        "pt_index": np.int64, "pt_pages": np.int32, "seq_lens": np.int32, "prefix_lens": np.int32,
        "q_start": np.int32, "sample_rows": np.int64, "ext_q_start": np.int32}


def test_page_table_is_incremental():
    """Only the pages a request gained are uploaded; replaced pages rewrite the row; a
    freed row is reused."""
    table = PageTable(torch.device("cpu"), rows=2, cols=2)
    r = _req(6, [], [4, 5])
    s = StepArrays.build((Chunk(r, 0, 6, True),), 4, table)
    assert _device_table(table, s) == [[4, 5]]
    r.output_ids, r.pages = [1, 2, 3], [4, 5, 8]                 # decode at position 8: a new page
    s = StepArrays.build((Chunk(r, 8, 1, True),), 4, table)
    assert s.arrays["pt_pages"].tolist() == [8] and _device_table(table, s) == [[4, 5, 8]]
    s = StepArrays.build((Chunk(r, 8, 1, True),), 4, table)      # nothing new
    assert s.arrays["pt_pages"].tolist() == [] and _device_table(table, s) == [[4, 5, 8]]
    r.pages, r.page_table_synced = [6, 5, 8], 0                  # what KVManager does on a dedup
    s = StepArrays.build((Chunk(r, 8, 1, True),), 4, table)
    assert _device_table(table, s) == [[6, 5, 8]]
    row = r.page_table_row
    table.release(r)
    other = _req(3, [], [9])
    StepArrays.build((Chunk(other, 0, 3, True),), 4, table)
    assert other.page_table_row == row


def test_step_arrays_decode_padding():
    chunks = (Chunk(_req(5, [1], [3, 7]), 5, 1, True), Chunk(_req(2, [4], [9]), 2, 1, True))
    table = PageTable(torch.device("cpu"))
    s = StepArrays.build(chunks, 4, table)
    assert s.max_q_len == 1 and s.all_sample and s.num_decode == 2
    p = s.padded(4)
    a = p.arrays
    assert a["out_slots"].tolist() == [7 * 4 + 1, 9 * 4 + 2, -1, -1]
    assert a["seq_lens"].tolist() == [6, 3, 1, 1] and _device_table(table, p) == [[3, 7], [9, 0], [0, 0], [0, 0]]
    assert a["q_start"].tolist() == [0, 1, 2, 3, 4] and a["sample_rows"].tolist() == [0, 1]
    assert s.padded(2) is s


def test_reference_decode_ignores_unwritten_slots():
    """NaN in slots past a sequence's end (never written) must not reach the output."""
    from kernels.triton import reference
    torch.manual_seed(0)
    kc, vc = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    kc[6:], vc[6:] = float("nan"), float("nan")                  # page 1 holds positions 4, 5 only
    q = torch.randn(2, 4, 8)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    kc[8:16], vc[8:16] = torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    o = reference.decode_attention(q, kc, vc, table, torch.tensor([6, 8], dtype=torch.int32), 4, 0.3)
    assert torch.isfinite(o).all()


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


def test_route_buckets_pads_past_slow_row_counts():
    """A bucket whose graph replays slower than a larger one's (cuBLAS's slow kernel for
    448 rows on an H100) sends its batches to the fastest larger one; noise under the
    margin routes nothing."""
    times = {416: 10.0, 432: 9.0, 448: 13.6, 464: 9.5, 480: 9.7, 512: 9.6}
    assert route_buckets(times) == {416: 432, 432: 432, 448: 464, 464: 464, 480: 480, 512: 512}
    flat = {1: 6.0, 2: 6.1, 4: 5.95, 8: 6.05}
    assert route_buckets(flat) == {b: b for b in flat}
    assert route_buckets({8: 2.0, 16: 1.0, 24: 1.5}) == {8: 16, 16: 16, 24: 24}


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
    r.graphs.replay = lambda dev, b, batch: calls.append((dev["seq_lens"].shape[0], b)) or replay(dev, b, batch)
    assert greedy(eng, ps, 12) == want
    assert (4, 3) in calls or (4, 4) in calls
    assert all(bs in (1, 2, 4) and b <= bs for bs, b in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_piecewise_cut_forward(tiny, family):
    """Prefill and mixed steps through the piecewise graphs' cut forward (token rows padded
    to a bucket, q/k/v through the static buffers, attention between the pieces on the
    real rows), run eagerly: the same ids as the plain forward, with decode graphs too."""
    folder, _ = tiny[family]
    ps = prompts(5, [9, 40, 3, 70, 22, 31])
    want = greedy(make(folder, chunk=48), ps, 12)
    eng = make(folder, chunk=48)
    r = eng.runner
    r.piecewise = PiecewiseGraphs(r.model, r.backend, 48, eng.device, use_graphs=False)
    r.graphs = DecodeGraphs(r.model, r.backend, 4, eng.context_len // 4, eng.device, use_graphs=False)
    calls = []
    run = r.piecewise.run
    r.piecewise.run = lambda dev, n, meta: calls.append((dev["input_ids"].shape[0], n)) or run(dev, n, meta)
    assert greedy(eng, ps, 12) == want
    assert r.piecewise.buckets == [16, 32, 48]
    assert (48, 48) in calls and any(b > n for b, n in calls), calls      # full budgets and padded steps
    assert all(b in r.piecewise.buckets and b >= n for b, n in calls)


def test_token_buckets():
    assert token_buckets(2048) == [16, 32, 64, 128] + list(range(256, 2049, 256))
    assert token_buckets(600) == [16, 32, 64, 128, 256, 512, 600]
    assert token_buckets(8) == [8]


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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_overlap_gives_the_same_ids(tiny, backend):
    """The CUDA overlap executor emulated on CPU: step N+1 scheduled and launched before
    step N's ids are read back (placeholders resolved from the device ring). Same ids,
    finish reasons and (up to fp32 rounding) logprobs as without overlap, with chunked prefill, a prefix-cache
    hit, stop tokens (the extra launched token dropped), penalties and seeded sampling
    that read placeholder ids, and a pool small enough to retract."""
    folder, _ = tiny["llama"]
    ps = prompts(8, [30, 45, 20, 60, 38, 51, 12, 7])
    ps += [ps[3][:40] + [9, 9, 9]]
    plain = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    probe = make(folder, backend).generate(ps, plain)
    stop = probe[0].output_ids[5]                       # ends some requests early, others not
    params = [SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[stop], logprobs=True,
                             top_logprobs=2),
              SamplingParams(temperature=0.8, seed=7, max_new_tokens=20, frequency_penalty=0.5,
                             repetition_penalty=1.2),
              SamplingParams(temperature=0, max_new_tokens=17, min_new_tokens=9, stop_token_ids=[stop])] * 3

    def run(overlap: bool, tokens: int):
        eng = make(folder, backend, tokens=tokens, chunk=48, max_running=6)
        eng.executor.overlap = overlap
        res = eng.generate(ps, params[:len(ps)])
        eng.check_integrity()
        assert not eng.executor.busy and not eng.scheduler.running
        return [(r.output_ids, r.finish_reason, r.logprobs, r.top_logprobs) for r in res], eng

    want, _ = run(False, 4096)
    got, _ = run(True, 4096)
    assert [x[:2] for x in got] == [x[:2] for x in want]
    for g, w in zip(got, want):                         # batches differ: fp32 sums may round apart
        assert g[2] == pytest.approx(w[2], abs=1e-4)
        assert [[t for t, _ in row] for row in g[3]] == [[t for t, _ in row] for row in w[3]]
    assert any(len(w[0]) < 24 and w[1] == "stop" for w in want[::3])
    small, eng = run(True, 100)
    assert [x[:2] for x in small] == [x[:2] for x in want]
    assert eng.scheduler.num_retractions > 0


def test_overlap_stream_and_abort(tiny):
    """Outputs lag one step under overlap; an aborted request frees its pages and row."""
    folder, _ = tiny["qwen2"]
    eng = make(folder)
    eng.executor.overlap = True
    toks = [o.new_token_ids[0] for o in eng.stream(prompts(9, [20])[0], SamplingParams(temperature=0,
                                                                                      max_new_tokens=6))]
    ref = make(folder).generate(prompts(9, [20]), SamplingParams(temperature=0, max_new_tokens=6))[0]
    assert toks == ref.output_ids
    rid = eng.add_request(prompts(10, [25])[0], SamplingParams(max_new_tokens=50))
    for _ in range(4):
        eng.step()
    assert eng.abort(rid)
    while eng.has_unfinished():
        assert all(o.rid != rid for o in eng.step())
    eng.check_integrity()
    assert eng.kv.allocator.num_free + (eng.kv.cache.total_pages if eng.kv.cache else 0) == \
        eng.kv.allocator.num_pages - 1
