"""Greedy token ids equal transformers' on every engine path.

Tiny random Llama / Qwen2 / Qwen3 checkpoints and SmolLM2-135M-Instruct; a
single request, 16 mixed-length requests batched, a long cached prefix,
chunked prefill, retraction under a tiny pool, page sizes 1 and 16.
"""
from __future__ import annotations

import random

import pytest

from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.engine import Engine
from services.engine.sampling_params import SamplingParams
from tests.reference import Reference, assert_greedy_equal, make_tiny_checkpoint

FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder, Reference) built once per module."""
    out = {}
    for fam in FAMILIES:
        folder = make_tiny_checkpoint(fam, tmp_path_factory.mktemp(fam))
        out[fam] = (folder, Reference(folder))
    return out


def engine_for(folder, page_size=16, tokens=None, chunk=2048, max_running=64, policy="lpm") -> Engine:
    return Engine(EngineConfig(
        model=str(folder), dtype="float32", device="cpu",
        cache=CacheConfig(page_size=page_size, max_total_tokens=tokens or 8192),
        scheduler=SchedulerConfig(schedule_policy=policy, chunked_prefill_size=chunk, max_running_requests=max_running),
    ))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def prompts(seed: int, lengths, vocab=512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def check_all(engine: Engine, ref: Reference, ps: list[list[int]], n_new: int, what: str):
    results = engine.generate(ps, greedy(n_new))
    for i, (p, r) in enumerate(zip(ps, results)):
        want, gaps = ref.greedy(p, n_new)
        assert_greedy_equal(r.output_ids, want, gaps, f"{what} prompt {i}")
    engine.check_integrity()
    return results


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_single_and_batched(tiny, family, page_size):
    folder, ref = tiny[family]
    eng = engine_for(folder, page_size=page_size)
    check_all(eng, ref, prompts(1, [21]), 16, f"{family} single")
    lengths = [3, 5, 8, 13, 17, 21, 26, 31, 34, 40, 45, 49, 53, 58, 60, 64]
    check_all(eng, ref, prompts(2, lengths), 10, f"{family} batch of 16")


@pytest.mark.parametrize("family", FAMILIES)
def test_pure_torch_path(tiny, family, monkeypatch):
    """The torch ops and torch attention backend alone (what a GPU or a CPU without
    AVX-512 BF16 runs): same greedy ids."""
    from kernels import cpu as cpu_kernels
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    folder, ref = tiny[family]
    eng = engine_for(folder, page_size=4, chunk=32)
    assert eng.runner.backend.__class__.__name__ == "TorchAttentionBackend"
    check_all(eng, ref, prompts(12, [3, 29, 50, 64]), 10, f"{family} pure torch")
    base = prompts(13, [60])[0]
    check_all(eng, ref, [base, base[:50] + [1, 2, 3]], 6, f"{family} pure torch cached")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_cached_prefix(tiny, family, page_size):
    folder, ref = tiny[family]
    eng = engine_for(folder, page_size=page_size)
    base = prompts(3, [120])[0]
    check_all(eng, ref, [base], 4, f"{family} first")
    second = base[:100] + prompts(4, [12])[0]
    [res] = check_all(eng, ref, [second], 12, f"{family} cached prefix")
    assert res.num_cached_prompt == 100 // page_size * page_size


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_chunked_prefill(tiny, family, page_size):
    folder, ref = tiny[family]
    eng = engine_for(folder, page_size=page_size, chunk=24)
    check_all(eng, ref, prompts(5, [90, 47, 5]), 10, f"{family} chunked")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_retraction_under_tiny_pool(tiny, family, page_size):
    folder, ref = tiny[family]
    # 8 requests of ~40+30 tokens need ~560 tokens; the pool holds 192.
    eng = engine_for(folder, page_size=page_size, tokens=192)
    check_all(eng, ref, prompts(6, [40, 36, 44, 38, 41, 35, 39, 42]), 30, f"{family} retraction")
    assert eng.scheduler.num_retractions > 0
    eng.kv.cache.reset()
    assert eng.kv.allocator.num_free == eng.kv.allocator.num_pages - 1


# -- SmolLM2-135M-Instruct (the default model) ---------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    from services.engine.loader import resolve_model
    folder = resolve_model("smollm2-135m-instruct").path
    return folder, Reference(folder)


def test_smollm2_paths(smol):
    """fp32 on CPU: where the kernels build, decode matmuls read the GGUF's blocks
    (kernels/cpu/quant), prefill chunks the fp32 weights; both equal the reference."""
    from kernels.cpu import quant
    folder, ref = smol
    eng = engine_for(folder, page_size=16, chunk=64)
    if quant.available():
        model = eng.runner.model
        assert model.layers[0].self_attn.qkv_proj.quant is not None and model._quant_embed is not None
    tok = eng.tokenizer
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain gravity to a child in two sentences.", "List three prime numbers."]
    chat = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    eos = eng.eos_token_ids
    sp = SamplingParams(temperature=0.0, max_new_tokens=12)
    lengths = [5, 9, 17, 33, 70, 100, 130, 7, 64, 20, 3, 45, 90, 11, 150, 27]
    batch = chat + prompts(7, lengths[len(chat):], vocab=tok.vocab_size)
    results = eng.generate(batch, sp)
    for i, (p, r) in enumerate(zip(batch, results)):
        want, gaps = ref.greedy(p, 12, eos)
        assert_greedy_equal(r.output_ids, want, gaps, f"smollm2 batch prompt {i}")
    # a long cached prefix: the same system+question with a longer follow-up
    follow = chat[2] + prompts(8, [20], vocab=tok.vocab_size)[0]
    [r] = eng.generate([follow], sp)
    assert r.num_cached_prompt >= len(chat[2]) // 16 * 16 > 0
    want, gaps = ref.greedy(follow, 12, eos)
    assert_greedy_equal(r.output_ids, want, gaps, "smollm2 cached prefix")
    eng.check_integrity()


def test_smollm2_page1_retraction(smol):
    folder, ref = smol
    eng = engine_for(folder, page_size=1, tokens=160, chunk=32)
    ps = prompts(9, [30, 25, 35, 28], vocab=49152)
    results = eng.generate(ps, greedy(20))
    for i, (p, r) in enumerate(zip(ps, results)):
        want, gaps = ref.greedy(p, 20)
        assert_greedy_equal(r.output_ids, want, gaps, f"smollm2 retraction prompt {i}")
    assert eng.scheduler.num_retractions > 0


def test_smollm2_bf16_fast_cpu_path(smol):
    """bf16 on CPU runs the packed-weight matmuls and fused C++ ops. Its greedy ids
    equal the fp32 reference's up to bf16-sized ties (bf16 logits are rounded to
    0.06-0.25 here: two tokens often tie exactly, and which one wins depends on
    where each implementation rounds)."""
    from kernels import cpu as cpu_kernels
    from tests import reference
    if not cpu_kernels.has_bf16_gemv():
        pytest.skip("the bf16 CPU path needs AVX-512 BF16")
    folder, ref = smol
    eng = Engine(EngineConfig(model=str(folder), dtype="bfloat16", device="cpu",
                              cache=CacheConfig(page_size=16, max_total_tokens=4096)))
    assert eng.runner.model.layers[0].mlp.gate_up_proj.packed is not None
    tok = eng.tokenizer
    ps = [tok.apply_chat_template([{"role": "user", "content": q}])
          for q in ["What is the capital of France?", "Name a fruit.", "Say hello."]] + prompts(11, [40, 90], 49152)
    results = eng.generate(ps, SamplingParams(temperature=0.0, max_new_tokens=10))
    old, reference.TIE_TOL = reference.TIE_TOL, reference.BF16_MODEL_TIE
    try:
        for i, (p, r) in enumerate(zip(ps, results)):
            want, gaps = ref.greedy(p, 10, eng.eos_token_ids)
            assert_greedy_equal(r.output_ids, want, gaps, f"smollm2 bf16 prompt {i}")
    finally:
        reference.TIE_TOL = old


def test_model_config_kv_bytes_per_token():
    from services.engine.loader import resolve_model
    import torch
    cfg = resolve_model("smollm2-135m", "dummy").model_config
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 2 * 30 * 3 * 64 * 2
