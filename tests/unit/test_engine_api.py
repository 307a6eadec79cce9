"""Engine behaviour beyond greedy equality: abort, policies, validation,
seeded sampling through the engine, streaming, the CLI."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest

from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.engine import Engine, EngineError
from services.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.reference import make_tiny_checkpoint
from tests.unit.test_engine_greedy import prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def make(folder, **sched) -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype="float32", device="cpu",
                               cache=CacheConfig(page_size=4, max_total_tokens=2048),
                               scheduler=SchedulerConfig(**sched)))


def test_abort_frees_every_page(folder):
    eng = make(folder, chunked_prefill_size=16)
    rids = [eng.add_request(p, SamplingParams(max_new_tokens=50, ignore_eos=True)) for p in prompts(1, [40, 30, 20])]
    for _ in range(6):
        eng.step()
    assert any(r.pages for r in eng.scheduler.running)
    for rid in rids:
        assert eng.abort(rid)
    assert not eng.has_unfinished()
    eng.check_integrity()
    cache_pages = eng.kv.cache.total_pages
    assert eng.kv.allocator.num_free + cache_pages == eng.kv.allocator.num_pages - 1
    eng.kv.cache.reset()
    assert eng.kv.allocator.num_free == eng.kv.allocator.num_pages - 1
    assert not eng.abort("no-such-request")


def test_waiting_request_abort(folder):
    eng = make(folder, max_running_requests=1)
    a = eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=5))
    b = eng.add_request([4, 5, 6], SamplingParams(max_new_tokens=5))
    eng.step()
    assert eng.abort(b)
    while eng.has_unfinished():
        eng.step()
    eng.check_integrity()
    assert a and b


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_policies_serve_everything(folder, policy):
    eng = make(folder, schedule_policy=policy, max_running_requests=2)
    base = prompts(2, [32])[0]
    ps = [base + [i] for i in range(6)] + prompts(3, [10, 12])
    res = eng.generate(ps, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    assert all(len(r.output_ids) == 4 for r in res)
    if policy == "lpm":
        assert sum(r.num_cached_prompt for r in res) >= 4 * 32   # the first two run together, uncached


def test_lpm_prefers_cached_prefix(folder):
    eng = make(folder, schedule_policy="lpm", max_running_requests=1)
    base = prompts(4, [40])[0]
    eng.generate([base], SamplingParams(temperature=0, max_new_tokens=2))
    cold = eng.add_request(prompts(5, [40])[0], SamplingParams(max_new_tokens=2))
    warm = eng.add_request(base[:36] + [7, 8], SamplingParams(max_new_tokens=2))
    first = eng.step()
    assert [o.rid for o in first] == [warm] and cold


@pytest.mark.parametrize("bad, field", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop_token_ids=(10**6,)), "stop_token_ids"), (dict(top_k=-5), "top_k"),
])
def test_invalid_params_rejected_before_batching(folder, bad, field):
    eng = make(folder)
    with pytest.raises(SamplingParamsError) as e:
        eng.add_request([1, 2, 3], SamplingParams(**bad))
    assert e.value.field == field and field in str(e.value)
    assert not eng.has_unfinished()


def test_invalid_prompts(folder):
    eng = make(folder)
    with pytest.raises(EngineError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(EngineError, match="vocabulary"):
        eng.add_request([1, 99999], SamplingParams())
    with pytest.raises(EngineError, match="context"):
        eng.add_request([1] * 5000, SamplingParams())
    assert not eng.has_unfinished()


def test_seeded_sampling_independent_of_batch(folder):
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=12, ignore_eos=True)
    p = prompts(6, [15])[0]
    alone = make(folder).generate([p], sp)[0].output_ids
    others = [SamplingParams(temperature=0.8, max_new_tokens=9, ignore_eos=True)] * 5
    eng = make(folder)
    res = eng.generate(prompts(7, [9, 30, 4, 22, 17]) + [p], others + [sp])
    assert res[-1].output_ids == alone
    again = make(folder).generate([p], sp)[0].output_ids
    assert again == alone


def test_temperature_zero_and_top_k_one_equal_greedy(folder):
    p = prompts(8, [20])
    g = make(folder).generate(p, SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))[0]
    k1 = make(folder).generate(p, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=10, ignore_eos=True))[0]
    assert g.output_ids == k1.output_ids


def test_temperature_moves_distribution_on_a_model(folder):
    """Across many seeds, the first sampled token concentrates as temperature falls."""
    eng = make(folder)
    p = prompts(9, [12])[0]

    def entropy(temp: float) -> float:
        sps = [SamplingParams(temperature=temp, seed=s, max_new_tokens=1) for s in range(300)]
        counts = Counter(r.output_ids[0] for r in eng.generate([p] * 300, sps))
        return -sum(c / 300 * math.log(c / 300) for c in counts.values())

    cold, warm, hot = entropy(0.3), entropy(1.0), entropy(3.0)
    assert cold < warm < hot


def test_stop_and_min_new_tokens(folder):
    eng = make(folder)
    p = prompts(10, [16])[0]
    free = eng.generate([p], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))[0].output_ids
    stop = free[3]
    r = eng.generate([p], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop,)))[0]
    assert r.finish_reason == "stop" and r.output_ids[-1] == stop and len(r.output_ids) == free.index(stop) + 1
    r = eng.generate([p], SamplingParams(temperature=0, max_new_tokens=10, min_new_tokens=8, stop_token_ids=(stop,)))[0]
    assert len(r.output_ids) >= 8 and stop not in r.output_ids[:7]


def test_logprobs_through_engine(folder):
    eng = make(folder)
    r = eng.generate(prompts(11, [10]), SamplingParams(temperature=0, max_new_tokens=5, logprobs=True,
                                                         top_logprobs=3, ignore_eos=True))[0]
    assert len(r.logprobs) == 5 and len(r.top_logprobs) == 5
    for tok, lp, top in zip(r.output_ids, r.logprobs, r.top_logprobs):
        assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-5 and lp <= 0


def test_stream_yields_every_token(folder):
    eng = make(folder)
    p = prompts(12, [10])[0]
    sp = SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True)
    whole = eng.generate([p], sp)[0].output_ids
    streamed = [t for out in eng.stream(p, sp) for t in out.new_token_ids]
    assert streamed == whole
    eng.check_integrity()


def test_cli_generate_json(folder):
    out = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model", str(folder),
                          "--dtype", "float32", "--max-total-tokens", "1024", "--prompt", "hi",
                          "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    # the tiny checkpoint has no tokenizer: a clear error, no traceback
    assert out.returncode != 0 and "tokenizer" in out.stderr and "Traceback" not in out.stderr


def test_cli_missing_model_is_one_line():
    out = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model", "/no/such/model",
                          "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "/no/such/model" in out.stderr and len(out.stderr.strip().splitlines()) == 1
