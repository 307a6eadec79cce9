"""Bad input over REST and gRPC gets 4xx / INVALID_ARGUMENT naming the field at
fault, and the next valid request is served normally."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from tandem.v1 import tandem_pb2, tandem_pb2_grpc
from tests.integration import cluster

MODEL = "smollm2-135m-instruct"
LONG = [100] * 9000           # more tokens than the 8192-token context

REST_CASES = [
    ("/v1/completions", b"{not json", 400, "body"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 7}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 3}, 400, "top_logprobs"),
    ("/generate", {"sampling_params": {}}, 400, "text"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": "x"}}, 400, "sampling_params.top_k"),
    ("/generate", {"input_ids": "abc"}, 400, "input_ids"),
]


def _valid(base: str) -> None:
    status, body = cluster.http("POST", base + "/v1/completions",
                                {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 3, body


@pytest.mark.parametrize("path,body,status,param", REST_CASES,
                         ids=[f"{p}-{param}-{i}" for i, (p, _, _, param) in enumerate(REST_CASES)])
def test_rest_bad_input(disagg, path, body, status, param):
    got, resp = cluster.http("POST", disagg["base"] + path, body)
    assert got == status, resp
    err = resp["error"]
    assert err["param"] == param, err
    assert param.split("[")[0].split(".")[0] in err["message"]
    assert err["type"] in ("invalid_request_error", "not_found_error")
    _valid(disagg["base"])


GRPC_CASES = [
    (dict(text="hi", sampling={"max_new_tokens": 0}), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens"),
    (dict(text="hi", sampling={"temperature": -2.0}), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(text="hi", sampling={"max_new_tokens": 100000}), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_new_tokens"),
    (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(token_ids=tandem_pb2.TokenIds(ids=LONG)), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
    (dict(model="nope", text="hi"), grpc.StatusCode.NOT_FOUND, "model"),
    (dict(chat=tandem_pb2.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages"),
]


@pytest.mark.parametrize("kw,code,field", GRPC_CASES, ids=[f for _, _, f in GRPC_CASES])
def test_grpc_bad_input(disagg, kw, code, field):
    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{disagg['grpc_port']}") as ch:
            stub = tandem_pb2_grpc.TandemStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.Generate(tandem_pb2.GenerateRequest(**kw)):
                    pass
            assert e.value.code() == code
            assert e.value.details().startswith(field), e.value.details()
            ok = [m async for m in stub.Generate(tandem_pb2.GenerateRequest(
                text="Hello", sampling={"max_new_tokens": 2, "temperature": 0.0}))]
            assert sum(len(m.token_ids) for m in ok) == 2
    asyncio.run(go())
