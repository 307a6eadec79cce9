"""The REST bridge: OpenAI-compatible routes, SGLang's /generate, /health, /metrics.

The generation routes are plain ASGI (GenerationApp), everything else is
FastAPI. Streaming answers are Server-Sent Events, written once per batch of
tokens the worker sends (one token each at low load): each route has a
renderer, a plain function from a GenChunk to the bytes of its events (the
last one's end with [DONE] and go out with the end of the body, in one
write). Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}} with the matching HTTP status;
an error after the stream started is sent as a last event before [DONE].
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics
from .core import Gateway
from .parse import Parsed, parse_chat, parse_completion, parse_generate
from .types import ApiError, GenChunk, new_id as _new_id

log = logging.getLogger("tandem.gateway")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_SSE_RAW_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"
MAX_BODY_BYTES = 32 << 20


def _error_event(e: ApiError) -> bytes:
    return b"data: " + _dumps({"error": {"message": e.message, "type": e.type, "param": e.param,
                                         "code": e.code}}).encode() + b"\n\n"


def _usage(c: GenChunk) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}


class GenerationApp:
    """The ASGI app: the three generation routes are served here directly, the
    rest by FastAPI. Generation is the hot path (every token of every stream
    goes through it), and FastAPI's middleware stack wraps each send of a
    stream in half a dozen layers; this path sends straight to uvicorn."""

    def __init__(self, gw: Gateway, fallback: FastAPI):
        self.gw = gw
        self.fallback = fallback
        self.keys = set(gw.cfg.api_key)
        self.routes = {"/v1/chat/completions": ("chat", parse_chat, _chat_stream, _chat_full),
                       "/v1/completions": ("completions", parse_completion, _completion_stream, _completion_full),
                       "/generate": ("generate", parse_generate, _generate_stream, _generate_full)}

    async def __call__(self, scope, receive, send) -> None:
        route = self.routes.get(scope.get("path")) if scope["type"] == "http" else None
        if route is None:
            return await self.fallback(scope, receive, send)
        if scope["method"] != "POST":
            return await _send_json(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", b"POST")])
        await self.run(route, scope, receive, send)

    def _check_key(self, scope) -> None:
        if not self.keys:
            return
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        if not auth.startswith("Bearer ") or auth[7:] not in self.keys:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    async def run(self, route, scope, receive, send) -> None:
        name, parse, stream_fn, full_fn = route
        try:
            self._check_key(scope)
            body = await _read_json(receive)
            p = parse(self.gw, body)
            gen = self.gw.generate(p.req)
            first = await anext(gen)          # routing and worker errors surface as a status, not a stream
        except ApiError as e:
            metrics.REQUESTS.labels(name, str(e.status)).inc()
            return await _send_error(send, e)
        except Exception as e:                # a bug: say so in OpenAI's shape, keep serving
            log.exception("%s: unexpected error", name)
            metrics.REQUESTS.labels(name, "500").inc()
            return await _send_error(send, ApiError(500, f"internal error: {type(e).__name__}: {e}"))
        metrics.REQUESTS.labels(name, "200").inc()
        if p.stream:
            return await _send_sse(stream_fn(p), first, gen, receive, send)
        try:
            out = await full_fn(p, _chain(first, gen))
        except ApiError as e:
            return await _send_error(send, e)
        await _send_json(send, 200, out)


async def _read_json(receive) -> dict:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ApiError(400, "body: the client went away before sending it", "body")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"body: larger than {MAX_BODY_BYTES >> 20} MiB", "body")
        chunks.append(chunk)
        if not msg.get("more_body"):
            break
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as e:
        raise ApiError(400, f"body: not valid JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body: must be a JSON object", "body")
    return body


async def _send_json(send, status: int, obj, headers: list | None = None) -> None:
    body = _dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send, e: ApiError) -> None:
    headers = [(b"retry-after", str(max(1, round(e.retry_after))).encode())] if e.retry_after else None
    await _send_json(send, e.status, {"error": {"message": e.message, "type": e.type, "param": e.param,
                                                "code": e.code}}, headers)


Renderer = Callable[[GenChunk], bytes]


async def _send_sse(render: Renderer, first: GenChunk, rest: AsyncIterator[GenChunk], receive, send) -> None:
    """Server-sent events straight onto the ASGI send channel, one write per chunk;
    the last chunk's events, [DONE] and the end of the body go in one. One task
    watches for the client going away and cancels the stream, which cancels the
    worker call and frees the request's pages."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_RAW_HEADERS})
    task = asyncio.current_task()

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        try:
            body = render(first)
            if first.finish_reason is None:
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                async for c in rest:
                    body = render(c)
                    if c.finish_reason is not None:
                        break
                    if body:                  # e.g. a character still held back: nothing to say yet
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                else:                         # the stream ended without a last chunk
                    body = _DONE
        except ApiError as e:                 # mid-stream: the status line is out, so a last event says it
            body = _error_event(e) + _DONE
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except asyncio.CancelledError:
        if not watcher.done():
            raise
    finally:
        watcher.cancel()
        await rest.aclose()


def build_app(gw: Gateway) -> GenerationApp:
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "tandem",
             "max_model_len": m.context_length} for m in gw.models.values()]}

    @app.get("/health")
    async def health():
        ready = gw.ready()
        workers = {a: {"healthy": w.state.healthy, "role": w.state.role, "model": w.state.model,
                       "running": w.state.running, "prefill_tokens": w.state.prefill_tokens}
                   for a, w in gw.workers.items()}
        return JSONResponse({"status": "ok" if ready else "unavailable", "workers": workers},
                            status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "1"})

    @app.get("/debug/index")
    async def debug_index():
        """Confirmed pages per worker in the global index, and a digest of each set."""
        out = {}
        for addr in gw.workers:
            pages = gw.index.snapshot(addr)
            digest = hashlib.blake2b(b"".join(h.to_bytes(8, "little") for h in sorted(pages)), digest_size=8)
            out[addr] = {"pages": len(pages), "digest": digest.hexdigest()}
        return out

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return GenerationApp(gw, app)


async def _chain(first: GenChunk, rest: AsyncIterator[GenChunk]) -> AsyncIterator[GenChunk]:
    yield first
    async for c in rest:
        yield c


def _token_text(p: Parsed, tid: int) -> str:
    return p.entry.tokenizer.decode([tid])


# ---- chat ----------------------------------------------------------------------------------------
def _chat_logprobs(p: Parsed, c: GenChunk) -> dict | None:
    if p.logprobs is None:
        return None
    content = []
    for tid, (lp, top) in zip(c.token_ids, c.logprobs):
        tok = _token_text(p, tid)
        content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                        "top_logprobs": [{"token": _token_text(p, t), "logprob": v,
                                          "bytes": list(_token_text(p, t).encode())} for t, v in top]})
    return {"content": content}


def _chat_stream(p: Parsed) -> Renderer:
    cid, created = f"chatcmpl-{_new_id()}", int(time.time())
    head = ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":['
            % (cid, created, _dumps(p.entry.name))).encode()
    started = False

    def render(c: GenChunk) -> bytes:
        nonlocal started
        out = []
        if not started:
            started = True
            out.append(head + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                              b'"finish_reason":null}]}\n\n')
        lp = _chat_logprobs(p, c)
        if c.text or lp:
            out.append(head + _dumps({"index": 0, "delta": {"content": c.text}, "logprobs": lp,
                                      "finish_reason": None}).encode() + b"]}\n\n")
        if c.finish_reason:
            out.append(head + _dumps({"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": c.finish_reason}).encode() + b"]}\n\n")
            if p.include_usage:
                out.append(head + b'],"usage":' + _dumps(_usage(c)).encode() + b"}\n\n")
            out.append(_DONE)
        return b"".join(out)
    return render


async def _chat_full(p: Parsed, chunks: AsyncIterator[GenChunk]) -> dict:
    texts, lps, last = [], [], None
    async for c in chunks:
        texts.append(c.text)
        if p.logprobs is not None:
            lps += _chat_logprobs(p, c)["content"]
        last = c
    return {"id": f"chatcmpl-{_new_id()}", "object": "chat.completion", "created": int(time.time()),
            "model": p.entry.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                         "logprobs": {"content": lps} if p.logprobs is not None else None,
                         "finish_reason": last.finish_reason}],
            "usage": _usage(last)}


# ---- completions ---------------------------------------------------------------------------------
def _completion_logprobs(p: Parsed, c: GenChunk) -> dict | None:
    if p.logprobs is None:
        return None
    toks = [_token_text(p, t) for t in c.token_ids]
    return {"tokens": toks, "token_logprobs": [lp for lp, _ in c.logprobs],
            "top_logprobs": [{_token_text(p, t): v for t, v in top} for _, top in c.logprobs]}


def _completion_stream(p: Parsed) -> Renderer:
    cid, created = f"cmpl-{_new_id()}", int(time.time())
    head = ('data: {"id":"%s","object":"text_completion","created":%d,"model":%s,"choices":['
            % (cid, created, _dumps(p.entry.name))).encode()

    def render(c: GenChunk) -> bytes:
        out = b""
        if c.text or c.finish_reason or p.logprobs is not None:
            out = head + _dumps({"index": 0, "text": c.text, "logprobs": _completion_logprobs(p, c),
                                 "finish_reason": c.finish_reason}).encode() + b"]}\n\n"
        if c.finish_reason:
            if p.include_usage:
                out += head + b'],"usage":' + _dumps(_usage(c)).encode() + b"}\n\n"
            out += _DONE
        return out
    return render


async def _completion_full(p: Parsed, chunks: AsyncIterator[GenChunk]) -> dict:
    texts, last = [], None
    lps = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    async for c in chunks:
        texts.append(c.text)
        if p.logprobs is not None:
            for k, v in _completion_logprobs(p, c).items():
                lps[k] += v
        last = c
    return {"id": f"cmpl-{_new_id()}", "object": "text_completion", "created": int(time.time()),
            "model": p.entry.name,
            "choices": [{"index": 0, "text": "".join(texts), "logprobs": lps if p.logprobs is not None else None,
                         "finish_reason": last.finish_reason}],
            "usage": _usage(last)}


# ---- SGLang /generate ----------------------------------------------------------------------------
def _finish(c: GenChunk) -> dict | None:
    if c.finish_reason is None:
        return None
    if c.finish_reason == "length":
        return {"type": "length", "length": c.completion_tokens}
    return {"type": c.finish_reason, "matched": c.token_ids[-1] if c.token_ids else None}


def _meta(p: Parsed, rid: str, n: int, c: GenChunk, t0: float) -> dict:
    m = {"id": rid, "prompt_tokens": len(p.req.prompt_ids), "completion_tokens": n,
         "cached_tokens": c.cached_tokens, "finish_reason": _finish(c)}
    if c.finish_reason:
        m["e2e_latency"] = time.perf_counter() - t0
    return m


def _generate_stream(p: Parsed) -> Renderer:
    """One event per token with the cumulative text and ids, as SGLang streams."""
    rid, t0 = p.req.request_id or _new_id(), time.perf_counter()
    text, ids, csv = "", [], ""              # csv: the ids so far, as the JSON list's inside
    mid = ('],"meta_info":{"id":%s,"prompt_tokens":%d,"completion_tokens":' % (
        _dumps(rid), len(p.req.prompt_ids)))

    def render(c: GenChunk) -> bytes:
        nonlocal text, csv
        before = _dumps(text) if len(c.token_ids) > 1 else ""   # every event's text but the last's
        text += c.text
        events = []
        last = len(c.token_ids) - 1
        for i, tid in enumerate(c.token_ids):
            ids.append(tid)
            csv = f"{csv},{tid}" if csv else str(tid)
            if i < last or not c.finish_reason:
                events.append('data: {"text":%s,"output_ids":[%s%s%d,"cached_tokens":0,"finish_reason":null}}\n\n'
                              % (_dumps(text) if i == last else before, csv, mid, len(ids)))
        if c.finish_reason:
            events.append("data: " + _dumps({"text": text, "output_ids": ids,
                                             "meta_info": _meta(p, rid, len(ids), c, t0)}) + "\n\n")
        out = "".join(events).encode()
        return out + _DONE if c.finish_reason else out
    return render


async def _generate_full(p: Parsed, chunks: AsyncIterator[GenChunk]) -> dict:
    rid, t0 = p.req.request_id or _new_id(), time.perf_counter()
    texts, ids, last = [], [], None
    async for c in chunks:
        texts.append(c.text)
        ids += c.token_ids
        last = c
    return {"text": "".join(texts), "output_ids": ids, "meta_info": _meta(p, rid, len(ids), last, t0)}
