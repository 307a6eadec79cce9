"""The engine on a GPU: greedy ids of every attention backend equal transformers'.

Skipped without CUDA. Backends: torch (the reference), triton (the default),
flashinfer where it imports. Tiny random checkpoints in fp32; SmolLM2 (when
its GGUF is installed) and a random checkpoint of the Llama-3.2-1B shape in
bf16. CUDA graphs on and off, overlap on (the default) and off, prefix-cache
hits, chunked prefill, a pool that fills up, and the memory a
--mem-fraction-static engine takes.

In bf16 both sides round differently, so sequences are compared up to ties
with a bf16-sized tolerance; graph replay and eager decode of a batch whose
size is a captured bucket must give the very same ids.
"""
from __future__ import annotations

import gc

import pytest
import torch

from services.engine.attention.flashinfer_backend import flashinfer_available
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.engine import Engine
from services.engine.sampling_params import SamplingParams
from tests import reference
from tests.reference import Reference, assert_greedy_equal, make_tiny_checkpoint
from tests.unit.test_engine_greedy import prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BACKENDS = ["torch", "triton"] + (["flashinfer"] if flashinfer_available() else [])
GRAPH_BACKENDS = BACKENDS[1:]          # the paged ones: CUDA graphs (decode and piecewise)
BF16_TOL = 0.15


def engine(folder, dtype, backend="triton", page_size=16, tokens=16384, chunk=2048, graphs=True,
           max_running=32, load_format="auto", overlap=True, **cache) -> Engine:
    gc.collect()
    torch.cuda.empty_cache()
    return Engine(EngineConfig(model=str(folder), load_format=load_format, dtype=dtype, device="cuda",
                               attention_backend=backend, disable_cuda_graph=not graphs,
                               disable_overlap=not overlap,
                               cache=CacheConfig(page_size=page_size, max_total_tokens=tokens, **cache),
                               scheduler=SchedulerConfig(chunked_prefill_size=chunk,
                                                         max_running_requests=max_running)))


def run(eng: Engine, ps, n: int, eos=()) -> list[list[int]]:
    res = eng.generate(ps, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=not eos))
    eng.check_integrity()
    return [r.output_ids for r in res]


def check(got, ref, ps, n, eos=(), what="", tol=None):
    old = reference.TIE_TOL
    reference.TIE_TOL = tol or old
    try:
        for i, (p, g) in enumerate(zip(ps, got)):
            want, gaps = ref.greedy(p, n, eos)
            assert_greedy_equal(g, want, gaps, f"{what} prompt {i}")
    finally:
        reference.TIE_TOL = old


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_tiny_fp32_gpu(tmp_path, family, page_size, backend):
    if backend == "flashinfer":
        pytest.skip("flashinfer has no fp32 kernels")
    folder = make_tiny_checkpoint(family, tmp_path / family)
    ref = Reference(folder, device="cuda")
    eng = engine(folder, "float32", backend, page_size=page_size, chunk=32)
    ps = prompts(1, [5, 17, 40, 64, 90, 3, 33, 21])
    check(run(eng, ps, 12), ref, ps, 12, what=f"{family} {backend} fp32")
    base = prompts(2, [80])[0]
    cached = [base[:70] + [5, 6, 7]]
    check(run(eng, cached, 8), ref, cached, 8, what=f"{family} {backend} cached")


def dummy_checkpoint(name: str, tmp_path_factory):
    """A random bf16 checkpoint of a registry shape (transformers' own init), and its reference."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from services.engine.model_registry import get_known
    hf = dict(get_known(name).hf_config)
    cfg = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    cfg.architectures = hf["architectures"]
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return folder, Reference(folder, dtype=torch.bfloat16, device="cuda")


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    return dummy_checkpoint("llama-3.2-1b", tmp_path_factory)


def _1b_prompts():
    ps = prompts(5, [7, 40, 130, 300, 9, 64, 200, 18], vocab=128000)     # 768 tokens: a piecewise bucket
    shared = prompts(6, [180], vocab=128000)[0]
    return ps, [shared + [11, 12], shared[:150] + [13, 14, 15, 16]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_1b_shape_bf16(llama_1b, backend):
    """8 prompts under chunked prefill (chunk 64: mixed prefill + decode steps), then two
    prompts of which the second reuses the first's cached prefix."""
    folder, ref = llama_1b
    ps, cached = _1b_prompts()
    eng = engine(folder, "bfloat16", backend, chunk=64)
    assert (eng.runner.piecewise is not None) == (backend in GRAPH_BACKENDS)   # mixed steps replay the layers
    check(run(eng, ps, 16), ref, ps, 16, what=f"1b {backend}", tol=BF16_TOL)
    got_cached = run(eng, cached[:1], 8)
    res = eng.generate(cached[1:], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    assert res[0].num_cached_prompt >= 144, "no prefix-cache hit"
    check(got_cached + [res[0].output_ids], ref, cached, 8, what=f"1b {backend} cached", tol=BF16_TOL)
    eng.check_integrity()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "smollm2-135m"])
def test_gqa_shapes_bf16(tmp_path_factory, shape, backend):
    """Other head layouts in bf16: Qwen2.5-0.5B (14 q heads on 2 KV heads, a group of 7 that
    flashinfer's plain decode kernel lacks; qkv bias) and SmolLM2-135M (9 on 3), under
    chunked prefill, CUDA graphs where the backend has them."""
    folder, ref = dummy_checkpoint(shape, tmp_path_factory)
    ps = prompts(7, [7, 40, 130, 9, 64, 18], vocab=49152)
    eng = engine(folder, "bfloat16", backend, chunk=64)
    check(run(eng, ps, 12), ref, ps, 12, what=f"{shape} {backend}", tol=BF16_TOL)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_llama_1b_graphs_equal_eager(llama_1b, backend):
    """One prefill step of 768 tokens (a piecewise bucket), then decode batches of 8 (a
    captured bucket) to the end: graph replay and eager forwards give the same ids (triton;
    flashinfer's both match the reference up to ties); a batch of 5 (padded) matches the
    reference up to ties. The buckets' measured routing only sends a bucket to a larger
    captured one."""
    folder, ref = llama_1b
    ps, _ = _1b_prompts()
    graphed = engine(folder, "bfloat16", backend, chunk=2048)
    g = graphed.runner.graphs
    assert g is not None and g.bucket(5) >= 8 and g.bucket(5) in g.graphs
    assert all(to >= b and to in g.graphs for b, to in g.route.items()), g.route   # measured routing
    g.route = {b: b for b in g.buckets}   # the ids below compare a batch of 8 with its own graph
    assert graphed.runner.piecewise is not None and graphed.runner.piecewise.bucket(768) == 768
    got = run(graphed, ps, 24)
    eager = engine(folder, "bfloat16", backend, chunk=2048, graphs=False)
    assert eager.runner.graphs is None
    eager_ids = run(eager, ps, 24)
    if backend == "triton":             # the same splits of the context either way: the same floats
        assert eager_ids == got, "CUDA graph replay and eager decode differ"
    else:                               # flashinfer plans a graph's batch in its own (padded) way
        check(eager_ids, ref, ps, 24, what=f"1b {backend} eager", tol=BF16_TOL)
    check(got, ref, ps, 24, what=f"1b {backend} graphs", tol=BF16_TOL)
    odd = ps[:5]
    check(run(graphed, odd, 16), ref, odd, 16, what=f"1b {backend} graphs, padded batch", tol=BF16_TOL)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("graphs", [True, False])
def test_llama_1b_overlap_equals_sync(llama_1b, graphs, backend):
    """The overlap executor (step N+1 launched before step N's ids are read back) gives the
    very ids of --disable-overlap: chunked prefill (mixed steps), a prefix-cache hit,
    requests that end at different lengths, penalties and seeded sampling. On flashinfer
    the host plans step N+1 while step N runs."""
    folder, _ = llama_1b
    ps, cached = _1b_prompts()
    ps = ps + cached
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (24, 9, 17, 30, 5, 24)]
    params += [SamplingParams(temperature=0.7, seed=3, max_new_tokens=20, ignore_eos=True, frequency_penalty=0.3,
                              repetition_penalty=1.1, logprobs=True, top_logprobs=3)] * (len(ps) - len(params))
    got = {}
    for overlap in (True, False):
        eng = engine(folder, "bfloat16", backend, chunk=64, graphs=graphs, overlap=overlap)
        assert eng.executor.overlap is overlap
        got[overlap] = [(r.output_ids, r.finish_reason) for r in eng.generate(ps, params)]
        eng.check_integrity()
        del eng
    assert got[True] == got[False], "overlap changes the ids"


def test_smollm2_gpu():
    from services.engine.loader import resolve_model
    try:
        folder = resolve_model("smollm2-135m-instruct").path
    except Exception as e:                # the GGUF package is not installed on this machine
        pytest.skip(f"SmolLM2 unavailable: {e}")
    ref = Reference(folder, dtype=torch.bfloat16, device="cuda")
    for backend in BACKENDS:
        for graphs in (True, False) if backend in GRAPH_BACKENDS else (True,):
            eng = engine(folder, "bfloat16", backend, chunk=64, graphs=graphs)
            tok = eng.tokenizer
            chats = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in
                     ["What is the capital of France?", "Name three colors.", "Write one sentence about cats."]]
            ps = chats + prompts(3, [9, 40, 77, 130, 200], vocab=tok.vocab_size)
            check(run(eng, ps, 16, eng.eos_token_ids), ref, ps, 16, eng.eos_token_ids,
                  f"smollm2 {backend} graphs={graphs}", tol=reference.BF16_MODEL_TIE)


@pytest.mark.parametrize("graphs,overlap", [(True, True), (False, True), (True, False)])
def test_pool_fills_up(tmp_path, graphs, overlap):
    """24 requests that need ~10x the pool: they wait, get retracted, and all finish with
    the reference's ids."""
    folder = make_tiny_checkpoint("llama", tmp_path / "llama")
    ref = Reference(folder, device="cuda")
    ps = prompts(7, [60, 90, 30, 120, 75, 45] * 4)
    eng = engine(folder, "float32", "triton", page_size=16, tokens=400, chunk=128, graphs=graphs, max_running=8,
                 overlap=overlap)
    check(run(eng, ps, 50), ref, ps, 50, what=f"filled pool graphs={graphs} overlap={overlap}")
    assert eng.scheduler.num_retractions > 0


def test_mem_fraction_static():
    """The pool takes what --mem-fraction-static leaves; the largest steps stay inside it."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.mem_get_info()[1]
    frac = 0.4
    eng = engine("llama-3.2-1b", "bfloat16", "triton", tokens=None, chunk=2048, max_running=64,
                 load_format="dummy", mem_fraction_static=frac)
    pool_tokens = (eng.kv.allocator.num_pages - 1) * eng.kv.ps
    assert pool_tokens > 100_000
    ps = prompts(8, [1500] * 64, vocab=128000)        # full prefill chunks, then a decode batch of 64
    run(eng, ps, 4)
    peak = torch.cuda.max_memory_reserved()
    assert peak <= frac * total, f"peak {peak / 2**30:.2f} GiB > {frac} of {total / 2**30:.1f} GiB"
