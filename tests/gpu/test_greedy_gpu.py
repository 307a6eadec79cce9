"""The engine on a GPU (torch backend, bf16 and fp32): greedy ids equal transformers'.

Skipped without CUDA. In bf16 both sides round differently, so sequences are
compared up to ties with a bf16-sized tolerance.
"""
from __future__ import annotations

import pytest
import torch

from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.engine import Engine
from services.engine.sampling_params import SamplingParams
from tests import reference
from tests.reference import Reference, assert_greedy_equal, make_tiny_checkpoint
from tests.unit.test_engine_greedy import prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def engine(folder, dtype, page_size=16, tokens=16384, chunk=2048) -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype=dtype, device="cuda",
                               cache=CacheConfig(page_size=page_size, max_total_tokens=tokens),
                               scheduler=SchedulerConfig(chunked_prefill_size=chunk)))


def check(eng, ref, ps, n, eos=(), what="", tol=None):
    old = reference.TIE_TOL
    reference.TIE_TOL = tol or old
    try:
        res = eng.generate(ps, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=not eos))
        for i, (p, r) in enumerate(zip(ps, res)):
            want, gaps = ref.greedy(p, n, eos)
            assert_greedy_equal(r.output_ids, want, gaps, f"{what} prompt {i}")
    finally:
        reference.TIE_TOL = old
    eng.check_integrity()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_tiny_fp32_gpu(tmp_path, family, page_size):
    folder = make_tiny_checkpoint(family, tmp_path / family)
    ref = Reference(folder, device="cuda")
    eng = engine(folder, "float32", page_size=page_size, chunk=32)
    check(eng, ref, prompts(1, [5, 17, 40, 64, 90, 3, 33, 21]), 12, what=f"{family} gpu fp32")
    base = prompts(2, [80])[0]
    check(eng, ref, [base[:70] + [5, 6, 7]], 8, what=f"{family} gpu cached")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_smollm2_gpu(dtype):
    from services.engine.loader import resolve_model
    folder = resolve_model("smollm2-135m-instruct").path
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    ref = Reference(folder, dtype=tdt, device="cuda")
    eng = engine(folder, dtype, chunk=64)
    tok = eng.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in
             ["What is the capital of France?", "Name three colors.", "Write one sentence about cats."]]
    ps = chats + prompts(3, [9, 40, 77, 130, 200], vocab=tok.vocab_size)
    check(eng, ref, ps, 16, eng.eos_token_ids, f"smollm2 gpu {dtype}",
          tol=0.15 if dtype == "bfloat16" else None)

