"""The official openai client against the REST bridge, through gateway -> decode
-> prefill (real processes): greedy text equals the engine's offline output."""
from __future__ import annotations

import json

import openai
import pytest

from tests.integration.conftest import offline_ids

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a quiet village,"]
CHATS = ["What is 2+2?", "Write a haiku about the sea."]
N = 24


@pytest.fixture(scope="module")
def client(disagg):
    return openai.OpenAI(base_url=disagg["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def want_completions():
    return offline_ids(PROMPTS, N)


@pytest.fixture(scope="module")
def want_chat():
    return offline_ids(CHATS, N, chat=True)


def test_models(client, model):
    assert model == "smollm2-135m-instruct"


def test_completions_equal_offline(client, model, want_completions):
    for prompt, want in zip(PROMPTS, want_completions):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0)
        assert r.choices[0].text == want["text"], prompt
        assert r.usage.completion_tokens == len(want["output_ids"])
        assert r.usage.prompt_tokens == len(want["prompt_ids"])
        assert r.choices[0].finish_reason in ("length", "stop")


def test_completions_stream_equal_offline(client, model, want_completions):
    for prompt, want in zip(PROMPTS, want_completions):
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        text, usage, reasons = [], None, []
        for ch in stream:
            if ch.choices:
                text.append(ch.choices[0].text)
                reasons.append(ch.choices[0].finish_reason)
            if ch.usage:
                usage = ch.usage
        assert "".join(text) == want["text"], prompt
        assert len(text) >= 2                           # it did stream
        assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
        assert usage.completion_tokens == len(want["output_ids"])


def test_chat_equal_offline(client, model, want_chat):
    for msg, want in zip(CHATS, want_chat):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": msg}],
                                           max_tokens=N, temperature=0)
        assert r.choices[0].message.content == want["text"], msg
        assert r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(want["prompt_ids"])


def test_chat_stream_equal_offline_with_usage(client, model, want_chat):
    for msg, want in zip(CHATS, want_chat):
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": msg}],
                                                max_tokens=N, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        text, usage = [], None
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                text.append(ch.choices[0].delta.content)
            if ch.usage:
                usage = ch.usage
        assert "".join(text) == want["text"], msg
        assert usage.prompt_tokens == len(want["prompt_ids"])
        assert usage.completion_tokens == len(want["output_ids"])
        # The same chat again: its prompt is now in the prefill worker's cache.
        assert usage.prompt_tokens_details.cached_tokens >= 0


def test_repeat_prompt_reports_cached_tokens(client, model):
    long_prompt = "Tandem serves language models. " * 20
    first = client.completions.create(model=model, prompt=long_prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=model, prompt=long_prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < n // 2
    assert again.usage.prompt_tokens_details.cached_tokens >= (n - 1) // 16 * 16
    assert again.choices[0].text == first.choices[0].text


def test_stop_strings(client, model, want_completions):
    want = want_completions[0]["text"]                 # " Paris. ..." style continuation
    stop = want.strip().split()[1] if len(want.split()) > 1 else want[-3:]
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == want[:want.index(stop)]


def test_a_stop_string_frees_the_worker(client, model, disagg, want_completions):
    """The gateway applies stop strings; when one ends a request, the decode worker is told to
    stop too, instead of generating on to max_tokens for nobody."""
    import time
    from tests.integration import cluster
    want = want_completions[0]["text"]
    stop = want.strip().split()[1] if len(want.split()) > 1 else want[-3:]
    before = cluster.scrape(disagg["decode_metrics"]).get("tandem_generated_tokens_total", 0.0)
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=400, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    deadline = time.monotonic() + 60
    while cluster.scrape(disagg["decode_metrics"]).get("tandem_worker_running_requests", 0.0) > 0:
        assert time.monotonic() < deadline, "the decode worker still runs the stopped request"
        time.sleep(0.05)
    made = cluster.scrape(disagg["decode_metrics"]).get("tandem_generated_tokens_total", 0.0) - before
    assert made < 100, f"the decode worker made {made:.0f} tokens for a request that stopped within {N}"


def test_generate_sglang_shape(disagg, want_completions):
    from tests.integration.cluster import http
    status, body = http("POST", disagg["base"] + "/generate",
                        {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": N, "temperature": 0}})
    assert status == 200, body
    want = want_completions[0]
    assert body["text"] == want["text"]
    assert body["output_ids"] == want["output_ids"]
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == len(want["prompt_ids"])
    assert meta["completion_tokens"] == len(want["output_ids"])
    assert "cached_tokens" in meta and meta["e2e_latency"] > 0
    assert meta["finish_reason"]["type"] in ("length", "stop")


def test_generate_stream_sglang_shape(disagg, want_completions):
    """/generate with stream: one event per token with the cumulative text and ids, SGLang's
    meta_info, the last event's finish_reason, then [DONE] at the very end."""
    import urllib.request
    req = urllib.request.Request(disagg["base"] + "/generate", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"text": PROMPTS[0], "stream": True, "sampling_params":
                                                  {"max_new_tokens": N, "temperature": 0}}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and raw.count("[DONE]") == 1
    events = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    want = want_completions[0]
    assert len(events) == len(want["output_ids"])
    for k, ev in enumerate(events, 1):
        assert ev["output_ids"] == want["output_ids"][:k]
        assert want["text"].startswith(ev["text"])
        assert ev["meta_info"]["completion_tokens"] == k
        assert (ev["meta_info"]["finish_reason"] is None) == (k < len(events))
    assert events[-1]["text"] == want["text"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] in ("length", "stop")


def test_a_gateway_on_grpc_decode_streams_the_same(disagg, model, want_completions, tmp_path):
    """--decode-transport grpc (Worker.DecodeStream instead of the framed TCP
    stream the default gateway uses): the same greedy text, streamed."""
    from tests.integration import cluster
    gw, port, _ = cluster.gateway("gateway_grpc", [disagg["prefill_port"], disagg["decode_port"]], tmp_path,
                                  extra=["--decode-transport", "grpc", "--grpc-port", "0"])
    try:
        cluster.wait_healthy(port, [gw], timeout=60)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt, want in zip(PROMPTS, want_completions):
            stream = c.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0, stream=True)
            assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want["text"], prompt
    finally:
        gw.stop()
