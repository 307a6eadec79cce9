"""The public Tandem gRPC service (Generate, ListModels, Tokenize) over Gateway.

Errors map ApiError's HTTP status to the gRPC code (400 INVALID_ARGUMENT,
404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 401 UNAUTHENTICATED),
with the message naming the field.
"""
from __future__ import annotations

import grpc

from services.common.sampling_params import SamplingParams, SamplingParamsError
from services.common.sampling_proto import from_proto as sampling_from_proto
from tandem.v1 import common_pb2, tandem_pb2, tandem_pb2_grpc

from .core import Gateway, ModelEntry
from .types import ApiError, GenRequest

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
          503: grpc.StatusCode.UNAVAILABLE}
DEFAULT_MAX_NEW_TOKENS = 128


def _code(e: ApiError) -> grpc.StatusCode:
    return _CODES.get(e.status, grpc.StatusCode.INTERNAL)


def _prompt_ids(entry: ModelEntry, which: str, msg) -> tuple[list[int], str]:
    if which == "token_ids":
        return list(msg.token_ids.ids), "token_ids"
    if which == "text":
        return entry.tokenizer.encode(msg.text), "text"
    if which == "chat":
        msgs = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
        if not msgs:
            raise ApiError(400, "chat.messages: must not be empty", "chat.messages")
        try:
            return entry.tokenizer.apply_chat_template(msgs), "chat"
        except Exception as e:
            raise ApiError(400, f"chat.messages: the chat template failed: {e}", "chat.messages") from None
    raise ApiError(400, "prompt: one of token_ids, text or chat is required", "prompt")


def _params(sp: common_pb2.SamplingParams, default_max: int) -> SamplingParams:
    try:
        return sampling_from_proto(sp, default_max)
    except SamplingParamsError as e:
        raise ApiError(400, f"sampling.{e.field}: {e}", f"sampling.{e.field}") from None


class TandemServicer(tandem_pb2_grpc.TandemServicer):
    def __init__(self, gw: Gateway):
        self.gw = gw
        self.keys = set(gw.cfg.api_key)

    async def _auth(self, context) -> None:
        if not self.keys:
            return
        md = dict(context.invocation_metadata() or ())
        auth = md.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.keys:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required (authorization: Bearer KEY)")

    async def Generate(self, request: tandem_pb2.GenerateRequest, context):
        await self._auth(context)
        try:
            entry = self.gw.model(request.model)
            ids, param = _prompt_ids(entry, request.WhichOneof("prompt"), request)
            default_max = max(1, min(DEFAULT_MAX_NEW_TOKENS, entry.context_length - len(ids)))
            params = _params(request.sampling, default_max)
            self.gw.check_prompt(entry, ids, param, params.max_new_tokens, "sampling.max_new_tokens")
            req = GenRequest(entry.name, ids, params, tuple(s for s in request.stop if s),
                             request.skip_special_tokens, request.request_id)
            async for c in self.gw.generate(req):
                msg = tandem_pb2.GenerateResponse(request_id=req.request_id, token_ids=c.token_ids, text=c.text)
                if c.logprobs:
                    msg.logprobs.extend(common_pb2.TokenLogprob(
                        logprob=lp, top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in top])
                        for lp, top in c.logprobs)
                if c.finish_reason:
                    msg.finish_reason = c.finish_reason
                    msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=c.prompt_tokens,
                                                        completion_tokens=c.completion_tokens,
                                                        cached_tokens=c.cached_tokens))
                await context.write(msg)
        except ApiError as e:
            await context.abort(_code(e), e.message)

    async def ListModels(self, request, context):
        await self._auth(context)
        return tandem_pb2.ListModelsResponse(models=[
            tandem_pb2.ModelInfo(id=m.name, context_length=m.context_length, num_workers=self.gw.num_workers(m.name))
            for m in self.gw.models.values()])

    async def Tokenize(self, request, context):
        await self._auth(context)
        try:
            entry = self.gw.model(request.model)
            which = request.WhichOneof("input")
            if which == "text":
                ids = entry.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
            elif which == "chat":
                ids, _ = _prompt_ids(entry, "chat", request)
            else:
                raise ApiError(400, "input: one of text or chat is required", "input")
        except ApiError as e:
            await context.abort(_code(e), e.message)
        return tandem_pb2.TokenizeResponse(token_ids=ids)
