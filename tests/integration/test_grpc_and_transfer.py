"""A client built from the generated stubs streams the same token ids over gRPC;
only the KV positions the decode worker lacks move (its metrics count them)."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from tandem.v1 import tandem_pb2, tandem_pb2_grpc
from tests.integration import cluster
from tests.integration.conftest import offline_ids

N = 16


async def _generate(target: str, **prompt) -> tuple[list[int], str, tandem_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = tandem_pb2_grpc.TandemStub(ch)
        ids, text, last = [], [], None
        req = tandem_pb2.GenerateRequest(sampling={"temperature": 0.0, "max_new_tokens": N}, **prompt)
        async for msg in stub.Generate(req):
            ids += msg.token_ids
            text.append(msg.text)
            last = msg
        return ids, "".join(text), last


def test_grpc_stub_streams_the_same_ids(disagg):
    target = f"127.0.0.1:{disagg['grpc_port']}"
    prompt = "The quick brown fox"
    want = offline_ids([prompt], N)[0]
    ids, text, last = asyncio.run(_generate(target, text=prompt))
    assert ids == want["output_ids"]
    assert text == want["text"]
    assert last.finish_reason in ("length", "stop")
    assert last.usage.prompt_tokens == len(want["prompt_ids"]) and last.usage.completion_tokens == len(ids)
    # The same prompt as token ids, and over REST: the same ids.
    ids2, _, _ = asyncio.run(_generate(target, token_ids=tandem_pb2.TokenIds(ids=want["prompt_ids"])))
    assert ids2 == ids
    status, body = cluster.http("POST", disagg["base"] + "/generate",
                                {"input_ids": want["prompt_ids"], "sampling_params": {"max_new_tokens": N,
                                                                                     "temperature": 0}})
    assert status == 200 and body["output_ids"] == ids


def test_grpc_list_models_and_tokenize(disagg):
    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{disagg['grpc_port']}") as ch:
            stub = tandem_pb2_grpc.TandemStub(ch)
            models = await stub.ListModels(tandem_pb2.ListModelsRequest())
            tok = await stub.Tokenize(tandem_pb2.TokenizeRequest(text="hello world"))
            return models, tok
    models, tok = asyncio.run(go())
    assert models.models[0].id == "smollm2-135m-instruct" and models.models[0].num_workers == 2
    assert len(tok.token_ids) == 2


def _received(mport: int) -> float:
    return cluster.scrape(mport).get('tandem_kv_transfer_tokens_total{direction="received"}', 0.0)


def test_only_the_missing_suffix_moves(disagg):
    rng = random.Random(7)
    base = [rng.randrange(1000, 40000) for _ in range(150)]
    more = base + [rng.randrange(1000, 40000) for _ in range(37)]
    url = disagg["base"] + "/v1/completions"
    r0 = _received(disagg["decode_metrics"])
    status, body = cluster.http("POST", url, {"prompt": base, "max_tokens": 2, "temperature": 0})
    assert status == 200, body
    r1 = _received(disagg["decode_metrics"])
    assert r1 - r0 == len(base)                       # nothing cached yet: every position moved
    status, body = cluster.http("POST", url, {"prompt": more, "max_tokens": 2, "temperature": 0})
    assert status == 200, body
    r2 = _received(disagg["decode_metrics"])
    held = len(base) // 16 * 16                       # the decode worker's full pages of `base`
    assert r2 - r1 == len(more) - held
    sent = cluster.scrape(disagg["prefill_metrics"])['tandem_kv_transfer_tokens_total{direction="sent"}']
    assert sent >= r2 - r0


class _FramedCall:
    """The framed-TCP decode stream (Info.decode_stream_port), read and written
    like grpc.aio's stream-stream call."""

    def __init__(self):
        from services.common.framed import FramedProtocol
        from tandem.v1 import worker_pb2
        self.q: asyncio.Queue = asyncio.Queue()
        self.proto = FramedProtocol(worker_pb2.DecodeStreamBatch.FromString, self.q.put_nowait,
                                    lambda why: self.q.put_nowait(None), server=False)

    async def connect(self, port: int) -> "_FramedCall":
        await asyncio.get_running_loop().create_connection(lambda: self.proto, "127.0.0.1", port)
        return self

    async def write(self, msg) -> None:
        self.proto.send(msg)

    def cancel(self) -> None:
        self.proto.close()

    def __aiter__(self):
        return self

    async def __anext__(self):
        b = await self.q.get()
        if b is None:
            raise StopAsyncIteration
        return b


@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_decode_stream_multiplexes_requests(disagg, transport):
    """The decode stream, as the gateway uses it, over gRPC (Worker.DecodeStream)
    and framed TCP: several requests on one stream (started in one message) each
    get their own greedy ids; a bad one fails alone with the field named; a
    second request with a running one's id fails both; a cancelled one stops and
    frees its pages."""
    from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
    prompt = "Name three rivers of Europe."
    want = offline_ids([prompt], N)[0]
    prefill = f"127.0.0.1:{disagg['prefill_port']}"

    def req(rid, **sampling):
        sp = common_pb2.SamplingParams(temperature=0.0, max_new_tokens=N, **sampling)
        return worker_pb2.DecodeRequest(request_id=rid, prompt_ids=want["prompt_ids"], sampling=sp,
                                        prefill_address=prefill)

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{disagg['decode_port']}") as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            if transport == "tcp":
                info = await stub.Info(worker_pb2.InfoRequest())
                assert info.decode_stream_port > 0
                call = await _FramedCall().connect(info.decode_stream_port)
            else:
                call = stub.DecodeStream()
            long = req("long")
            long.sampling.max_new_tokens = 400
            long.sampling.ignore_eos = True
            await call.write(worker_pb2.DecodeStreamRequest(start=[req("a"), req("b"), req("bad", top_p=2.0), long]))
            await call.write(worker_pb2.DecodeStreamRequest(start=[req("c")]))
            await call.write(worker_pb2.DecodeStreamRequest(start=[req("c")]))
            got, done, batches = {}, {}, 0
            async for batch in call:
                batches += len(batch.updates) > 1
                for u in batch.updates:
                    got.setdefault(u.request_id, []).extend(u.token_ids)
                    if u.finish_reason or u.error_code:
                        done[u.request_id] = u
                if "long" in got and len(got["long"]) >= 3 and "cancelled" not in done:
                    done["cancelled"] = None
                    await call.write(worker_pb2.DecodeStreamRequest(cancel=["long"]))
                if {"a", "b", "bad", "c"} <= done.keys() and "cancelled" in done:
                    break
            await asyncio.sleep(0.5)              # the cancel reaches the engine
            load = await stub.Load(worker_pb2.LoadRequest())
            call.cancel()
            return got, done, batches, load

    got, done, batches, load = asyncio.run(go())
    assert got["a"] == want["output_ids"] and got["b"] == want["output_ids"]
    assert done["a"].finish_reason and done["a"].usage.completion_tokens == len(want["output_ids"])
    assert done["bad"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert done["bad"].error_message.startswith("sampling.top_p")
    assert done["c"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert done["c"].error_message.startswith("request_id")
    assert "long" not in done and len(got["long"]) < 400
    assert batches > 0                    # tokens of several requests share messages
    assert load.load.running == 0 and load.load.waiting == 0
