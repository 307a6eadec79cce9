"""Worker.Decode: have the prompt prefilled, then stream tokens.

With a prefill address, the worker reserves pages for the prompt past its own
cached prefix (c_d tokens), calls Prefill on that worker with skip_tokens = c_d
and writes the KV chunks into the reserved pages as they come; a Prefill that
fails or times out frees the pages and fails this call. Without one, it
prefills locally (role both). Then the request decodes in the continuous
batch; each message carries every token produced since the last one.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from services.transfer import TransferError
from services.worker import metrics
from services.common.sampling_proto import from_proto as sampling_from_proto
from services.common.sampling_proto import to_proto as sampling_to_proto
from services.worker.convert import logprob_from_proto, logprobs_to_proto
from services.worker.errors import status_of
from services.worker.state import WorkerState
from tandem.v1 import common_pb2, worker_pb2

_RESERVE_TRIES = 200          # x 50 ms: how long a request waits for KV memory to free up


class DecodeFailed(Exception):
    """A request that could not start: the gRPC status to fail it with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


async def start(w: WorkerState, rid: str, request: worker_pb2.DecodeRequest, sink, trace: tuple = ()) -> None:
    """Have the prompt prefilled and the request running in the engine, its
    outputs going to `sink` (anything with put_nowait(StepOutput)). Raises
    DecodeFailed with nothing left behind; on return the caller owns `rid` and
    must abort it in the engine if it gives up before the request finishes."""
    if w.role == "prefill":
        raise DecodeFailed(grpc.StatusCode.FAILED_PRECONDITION, "this worker has role prefill: it does not decode")
    engine = w.loop.engine
    w.loop.open_sink(rid, sink)
    ok = False
    try:
        try:
            params = sampling_from_proto(request.sampling)
            prompt = list(request.prompt_ids)
            if request.prefill_address:
                await _remote_prefill(w, rid, prompt, params, request.prefill_address, trace)
            else:
                await w.loop.call(engine.add_request, prompt, params, rid)
        except (DecodeFailed, asyncio.CancelledError):
            raise
        except Exception as e:
            st = status_of(e)
            if st is None:
                raise
            metrics.REQUESTS.labels("decode", "invalid").inc()
            raise DecodeFailed(*st) from None
        ok = True
    finally:
        if not ok:
            w.loop.close_sink(rid)
            w.loop.post(engine.abort, rid)


def finish(msg, out, prompt_len: int, n_out: int) -> str | None:
    """Fill the last message of a request (a DecodeResponse or DecodeUpdate);
    the error to fail it with if the engine failed it."""
    if out.finish_reason == "error":
        metrics.REQUESTS.labels("decode", "error").inc()
        return f"request {out.rid} failed in the engine"
    metrics.REQUESTS.labels("decode", "ok").inc()
    msg.finish_reason = out.finish_reason or "stop"
    msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=prompt_len, completion_tokens=n_out,
                                        cached_tokens=out.num_cached_prompt))
    return None


async def decode(w: WorkerState, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
    """Worker.Decode: one request, one stream."""
    rid = request.request_id or w.new_rid()
    engine = w.loop.engine
    sink: asyncio.Queue = asyncio.Queue()
    try:
        await start(w, rid, request, sink, trace_metadata(context))
    except DecodeFailed as e:
        await context.abort(e.code, e.message)
    finished = False
    try:
        n_out = 0
        while not finished:
            outs = [await sink.get()]
            while not sink.empty():
                outs.append(sink.get_nowait())
            msg = worker_pb2.DecodeResponse()
            for out in outs:
                msg.token_ids.extend(out.new_token_ids)
                msg.logprobs.extend(logprobs_to_proto(out.logprobs, out.top_logprobs))
                n_out += len(out.new_token_ids)
                if out.finished:
                    finished = True
                    err = finish(msg, out, len(request.prompt_ids), n_out)
                    if err:
                        await context.abort(grpc.StatusCode.INTERNAL, err)
            metrics.GENERATED_TOKENS.inc(len(msg.token_ids))
            await context.write(msg)
    finally:
        w.loop.close_sink(rid)
        if not finished:                    # caller gone or failure: free every page now
            w.loop.post(engine.abort, rid)


async def _remote_prefill(w: WorkerState, rid, prompt, params, address, trace: tuple) -> None:
    engine = w.loop.engine
    res = None
    for _ in range(_RESERVE_TRIES):
        res = await w.loop.call(engine.reserve, prompt, params, rid)
        if res is not None:
            break
        await asyncio.sleep(0.05)
    if res is None:
        raise DecodeFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "no KV memory free for this prompt; retry later")
    _, cached = res
    t0 = time.perf_counter()
    call = w.peer(address).Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_ids=prompt, sampling=sampling_to_proto(params),
                                  skip_tokens=cached, transfer=w.transfer.descriptor()),
        timeout=w.prefill_timeout_s, metadata=trace)
    result = None
    chunks = []           # written with the activation, in one engine command: no step ever sees half
    try:
        async for resp in call:
            if resp.HasField("kv"):
                chunks.append(w.transfer.receive(resp.kv))
                metrics.TRANSFER_TOKENS.labels("received").inc(resp.kv.num_tokens)
                metrics.TRANSFER_BYTES.labels("received").inc(len(resp.kv.data))
            else:
                result = resp.result
    except grpc.aio.AioRpcError as e:
        metrics.TRANSFER_FAILURES.inc()
        code = e.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise DecodeFailed(code, e.details()) from None
        raise DecodeFailed(grpc.StatusCode.UNAVAILABLE, f"prefill worker {address}: {code.name}: {e.details()}") from None
    except (TransferError, ValueError) as e:
        call.cancel()
        metrics.TRANSFER_FAILURES.inc()
        raise DecodeFailed(grpc.StatusCode.INTERNAL, f"KV transfer from {address}: {e}") from None
    except asyncio.CancelledError:
        call.cancel()
        raise
    if result is None:
        raise DecodeFailed(grpc.StatusCode.UNAVAILABLE, f"prefill worker {address} sent no first token")
    metrics.TRANSFER_SECONDS.observe(time.perf_counter() - t0)
    metrics.PROMPT_TOKENS.labels("transferred").inc(result.sent_tokens)
    lp, top = logprob_from_proto(result.logprob) if result.HasField("logprob") else (None, None)
    def write_and_activate():
        for pos, kv in chunks:
            engine.write_kv(rid, pos, kv)
        out = engine.activate(rid, result.token_id, lp if params.logprobs else None,
                              top if params.top_logprobs else None, result.cached_tokens)
        w.loop.emit([out])        # through the sink, ahead of the tokens the next step makes

    try:
        await w.loop.call(write_and_activate)
    except Exception as e:
        metrics.TRANSFER_FAILURES.inc()
        raise DecodeFailed(grpc.StatusCode.INTERNAL, f"KV transfer from {address}: {e}") from None


def trace_metadata(context: grpc.aio.ServicerContext) -> tuple:
    """Pass the W3C trace context on to the prefill worker."""
    md = context.invocation_metadata() or ()
    return tuple((k, v) for k, v in md if k in ("traceparent", "tracestate"))
