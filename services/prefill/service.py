"""Worker.Prefill: compute the KV the caller lacks, push it, return the first token.

The engine runs the prompt as a one-token request (cached prefix reused,
chunked like any prefill) and, when it finishes, exports the KV of positions
[skip_tokens, n). The transfer backend moves it (inline chunks for `grpc`),
then the sampled token goes back last. The prompt stays in this worker's
prefix cache for later hits.
"""
from __future__ import annotations

import dataclasses

import grpc

from services.transfer import TransferError, get_backend
from services.worker import metrics
from services.common.sampling_proto import from_proto as sampling_from_proto
from services.worker.convert import logprobs_to_proto
from services.worker.errors import abort_for
from services.worker.state import WorkerState
from tandem.v1 import worker_pb2


async def prefill(w: WorkerState, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
    if w.role == "decode":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker has role decode: it does not prefill")
    desc = request.transfer
    if desc.backend and desc.backend != w.transfer.name:
        try:
            backend = get_backend(desc.backend, w.transfer.layout)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transfer.backend: {e}")
    else:
        backend = w.transfer
    rid = request.request_id or w.new_rid()
    sink = w.loop.open_sink(rid)
    done = False
    try:
        try:
            params = sampling_from_proto(request.sampling)
            one = dataclasses.replace(params, max_new_tokens=1, min_new_tokens=min(params.min_new_tokens, 1))
            await w.loop.call(w.loop.engine.add_request, list(request.prompt_ids), one, rid,
                              export_kv_from=request.skip_tokens)
        except Exception as e:
            metrics.REQUESTS.labels("prefill", "invalid").inc()
            await abort_for(context, e)
        out = await sink.get()
        done = True
        if out.finish_reason in ("error", "abort") or out.kv is None:
            metrics.REQUESTS.labels("prefill", "error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {rid} failed in the engine")
        n = len(request.prompt_ids)
        metrics.PROMPT_TOKENS.labels("cached").inc(out.num_cached_prompt)
        metrics.PROMPT_TOKENS.labels("computed").inc(n - out.num_cached_prompt)
        try:
            for chunk in backend.send(out.kv, request.skip_tokens, desc):
                metrics.TRANSFER_TOKENS.labels("sent").inc(chunk.num_tokens)
                metrics.TRANSFER_BYTES.labels("sent").inc(len(chunk.data))
                await context.write(worker_pb2.PrefillResponse(kv=chunk))
        except TransferError as e:
            metrics.TRANSFER_FAILURES.inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"transfer: {e}")
        lp = logprobs_to_proto(out.logprobs, out.top_logprobs)
        result = worker_pb2.PrefillResult(token_id=out.new_token_ids[0], cached_tokens=out.num_cached_prompt,
                                          sent_tokens=out.kv.shape[0])
        if lp:
            result.logprob.CopyFrom(lp[0])
        await context.write(worker_pb2.PrefillResponse(result=result))
        metrics.REQUESTS.labels("prefill", "ok").inc()
    finally:
        w.loop.close_sink(rid)
        if not done:
            w.loop.post(w.loop.engine.abort, rid)
