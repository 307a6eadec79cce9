"""The engine's halves of disaggregation: a prefill engine exports the KV a
decode engine lacks; the decode engine reserves pages, takes the KV and
decodes on. Greedy ids equal transformers' and a collocated run, with and
without a prefix the decode side already holds, for any page size; aborting a
reservation frees its pages."""
from __future__ import annotations

import dataclasses

import pytest

from services.engine.engine import Engine
from tests.reference import Reference, assert_greedy_equal, make_tiny_checkpoint
from tests.unit.test_engine_greedy import engine_for, greedy, prompts


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))
    return folder, Reference(folder)


def prefill(engine: Engine, prompt, params, skip: int):
    """What a prefill worker does: one token, and the KV of [skip, n)."""
    one = dataclasses.replace(params, max_new_tokens=1, min_new_tokens=min(params.min_new_tokens, 1))
    rid = engine.add_request(prompt, one, export_kv_from=skip)
    while True:
        for out in engine.step():
            if out.rid == rid:
                assert out.finished and out.kv is not None
                return out


def disaggregated(p_engine: Engine, d_engine: Engine, prompt, params):
    rid, cached = d_engine.reserve(prompt, params)
    first = prefill(p_engine, prompt, params, cached)
    assert first.kv.shape[0] == len(prompt) - cached
    d_engine.write_kv(rid, cached, first.kv)
    out = d_engine.activate(rid, first.new_token_ids[0], num_cached_prompt=first.num_cached_prompt)
    ids = list(out.new_token_ids)
    while not out.finished:
        for o in d_engine.step():
            if o.rid == rid:
                ids += o.new_token_ids
                out = o
    return ids, cached, first.num_cached_prompt


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_disaggregated_equals_reference(llama, page_size):
    folder, ref = llama
    p_engine, d_engine = engine_for(folder, page_size), engine_for(folder, page_size)
    shared = prompts(1, [40])[0]
    cases = [shared + tail for tail in prompts(2, [7, 13, 1])] + prompts(3, [5, 33])
    seen_cached = []
    for i, prompt in enumerate(cases):
        ids, cached, _ = disaggregated(p_engine, d_engine, prompt, greedy(12))
        want, gaps = ref.greedy(prompt, 12)
        assert_greedy_equal(ids, want, gaps, f"page {page_size} prompt {i}")
        seen_cached.append(cached)
    # The decode side kept the shared prefix: later requests moved only their tail.
    assert seen_cached[0] == 0
    assert all(c == 40 // page_size * page_size for c in seen_cached[1:3])
    for e in (p_engine, d_engine):
        e.check_integrity()


def test_only_the_missing_suffix_moves_and_prefill_cache_counts(llama):
    folder, _ = llama
    p_engine, d_engine = engine_for(folder, 16), engine_for(folder, 16)
    prompt = prompts(4, [70])[0]
    _, cached, p_cached = disaggregated(p_engine, d_engine, prompt, greedy(3))
    assert (cached, p_cached) == (0, 0)
    # A fresh decode engine, same prefill engine: the prefill side has 64 tokens cached.
    d2 = engine_for(folder, 16)
    _, cached, p_cached = disaggregated(p_engine, d2, prompt + [1, 2], greedy(3))
    assert (cached, p_cached) == (0, 64)


def test_abort_of_a_reservation_frees_its_pages(llama):
    folder, _ = llama
    d_engine = engine_for(folder, 4, tokens=256)
    free = d_engine.kv.allocator.num_free
    rid, _ = d_engine.reserve(prompts(5, [50])[0], greedy(4))
    assert d_engine.kv.allocator.num_free < free
    d_engine.check_integrity()
    assert d_engine.abort(rid)
    assert d_engine.kv.allocator.num_free == free
    d_engine.check_integrity()


def test_reserve_refuses_when_memory_lacks(llama):
    folder, _ = llama
    d_engine = engine_for(folder, 4, tokens=64)
    assert d_engine.reserve(prompts(6, [60])[0], greedy(4)) is not None
    assert d_engine.reserve(prompts(7, [60])[0], greedy(4)) is None
    d_engine.check_integrity()


def test_wrong_kv_shape_is_refused(llama):
    folder, _ = llama
    p_engine, d_engine = engine_for(folder, 4), engine_for(folder, 4)
    prompt = prompts(8, [9])[0]
    rid, cached = d_engine.reserve(prompt, greedy(2))
    kv = prefill(p_engine, prompt, greedy(2), cached).kv
    with pytest.raises(ValueError, match="does not fit"):
        d_engine.write_kv(rid, 0, kv[:, :1])
    d_engine.abort(rid)
    d_engine.check_integrity()
