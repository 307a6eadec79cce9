"""REST request bodies -> GenRequest, with errors naming the field (OpenAI names).

Covers /v1/chat/completions, /v1/completions (OpenAI, plus the vLLM/SGLang
extras top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens) and /generate (SGLang's shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.common.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, SamplingParamsError

from .core import Gateway, ModelEntry
from .types import ApiError, GenRequest

_MISSING = object()
MAX_STOP_STRINGS = 16


@dataclass
class Parsed:
    req: GenRequest
    entry: ModelEntry
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None          # completions: top-N per token; chat: top_logprobs


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


def _get(body: dict, name: str, kind, default=_MISSING, param: str | None = None):
    """body[name] checked against kind (int, float, bool, str, list, dict); default when absent/null."""
    param = param or name
    v = body.get(name)
    if v is None:
        if default is _MISSING:
            raise _bad(param, "is required")
        return default
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(param, f"must be a number, got {v!r}")
        return float(v)
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise _bad(param, f"must be an integer, got {v!r}")
        return v
    if not isinstance(v, kind):
        raise _bad(param, f"must be {kind.__name__ if kind is not str else 'a string'}, got {type(v).__name__}")
    return v


def _stop(body: dict, name: str, param: str | None = None) -> tuple[str, ...]:
    param = param or name
    v = body.get(name)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > MAX_STOP_STRINGS:
            raise _bad(param, f"at most {MAX_STOP_STRINGS} stop strings")
        return tuple(v)
    raise _bad(param, "must be a string or a list of strings")


def _token_ids(v: Any, param: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise _bad(param, "must be a list of integer token ids")
    return v


# Engine field -> the API's name for it, for error messages.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def _params(kw: dict, names: dict, prefix: str = "") -> SamplingParams:
    try:
        return SamplingParams(**kw).validate()
    except SamplingParamsError as e:
        field = prefix + names.get(e.field, e.field)
        raise ApiError(400, f"{field}: {str(e).replace(e.field, names.get(e.field, e.field))}", field) from None


def _openai_sampling(body: dict, max_tokens: int) -> dict:
    kw = dict(
        max_new_tokens=max_tokens,
        temperature=_get(body, "temperature", float, 1.0),
        top_p=_get(body, "top_p", float, 1.0),
        top_k=_get(body, "top_k", int, -1),
        min_p=_get(body, "min_p", float, 0.0),
        presence_penalty=_get(body, "presence_penalty", float, 0.0),
        frequency_penalty=_get(body, "frequency_penalty", float, 0.0),
        repetition_penalty=_get(body, "repetition_penalty", float, 1.0),
        min_new_tokens=_get(body, "min_tokens", int, 0),
        ignore_eos=_get(body, "ignore_eos", bool, False),
        stop_token_ids=tuple(_token_ids(body.get("stop_token_ids") or [], "stop_token_ids")),
        seed=_get(body, "seed", int, None),
    )
    if kw["seed"] is not None and kw["seed"] < 0:
        kw["seed"] %= 2**63                      # OpenAI clients may send negative seeds
    n = _get(body, "n", int, 1)
    if n != 1:
        raise _bad("n", "only n=1 is supported")
    return kw


def _max_tokens(body: dict, default: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = _get(body, name, int, default)
    if v < 1:
        raise _bad(name, f"must be >= 1, got {v}")
    return v


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    opts = _get(body, "stream_options", dict, {})
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("stream_options.include_usage", "must be a bool")
    return stream, include


def _messages(body: dict) -> list[dict]:
    msgs = _get(body, "messages", list)
    if not msgs:
        raise _bad("messages", "must not be empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role", "is required (a string)")
        content = m.get("content")
        if isinstance(content, list):                 # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content[{j}]", "only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({**m, "content": content if content is not None else ""})
    return out


def parse_chat(gw: Gateway, body: dict) -> Parsed:
    entry = gw.model(_get(body, "model", str, ""))
    msgs = _messages(body)
    try:
        ids = entry.tokenizer.apply_chat_template(msgs)
    except Exception as e:                           # template errors name no field of ours
        raise _bad("messages", f"the chat template failed: {e}") from None
    max_tokens = _max_tokens(body, max(1, entry.context_length - len(ids)))
    kw = _openai_sampling(body, max_tokens)
    lp = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int, 0)
    if top and not lp:
        raise _bad("top_logprobs", "requires logprobs: true")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
    kw.update(logprobs=lp, top_logprobs=top)
    params = _params(kw, _OPENAI_NAMES)
    gw.check_prompt(entry, ids, "messages", max_tokens,
                    "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens")
    stream, include = _stream_opts(body)
    req = GenRequest(entry.name, ids, params, _stop(body, "stop"),
                     _get(body, "skip_special_tokens", bool, True))
    return Parsed(req, entry, stream, include, top if lp else None)


def parse_completion(gw: Gateway, body: dict) -> Parsed:
    entry = gw.model(_get(body, "model", str, ""))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                               # a batch of one
    if isinstance(prompt, str):
        ids = entry.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise _bad("prompt", "is required")
    elif isinstance(prompt, list) and not prompt:
        ids = []
    else:
        raise _bad("prompt", "must be a string or a list of token ids (batches of several prompts are not supported)")
    if _get(body, "echo", bool, False):
        raise _bad("echo", "is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "is not supported")
    max_tokens = _max_tokens(body, 16)
    kw = _openai_sampling(body, max_tokens)
    lp = _get(body, "logprobs", int, None)
    if lp is not None and not 0 <= lp <= 5:
        raise _bad("logprobs", "must be in [0, 5]")
    kw.update(logprobs=lp is not None, top_logprobs=lp or 0)
    params = _params(kw, _OPENAI_NAMES)
    gw.check_prompt(entry, ids, "prompt", max_tokens)
    stream, include = _stream_opts(body)
    req = GenRequest(entry.name, ids, params, _stop(body, "stop"),
                     _get(body, "skip_special_tokens", bool, True))
    return Parsed(req, entry, stream, include, lp)


_SGLANG_KEYS = {"max_new_tokens": int, "min_new_tokens": int, "temperature": float, "top_p": float,
                "top_k": int, "min_p": float, "frequency_penalty": float, "presence_penalty": float,
                "repetition_penalty": float, "ignore_eos": bool}


def parse_generate(gw: Gateway, body: dict) -> Parsed:
    """SGLang's /generate: text or input_ids, sampling_params, stream, rid."""
    entry = gw.model(_get(body, "model", str, ""))
    if body.get("input_ids") is not None:
        ids = list(_token_ids(body["input_ids"], "input_ids"))
        param = "input_ids"
    else:
        text = _get(body, "text", str)
        ids, param = entry.tokenizer.encode(text), "text"
    sp = _get(body, "sampling_params", dict, {})
    kw: dict = {"max_new_tokens": 128}
    for key, kind in _SGLANG_KEYS.items():
        if sp.get(key) is not None:
            kw[key] = _get(sp, key, kind, param=f"sampling_params.{key}")
    kw["stop_token_ids"] = tuple(_token_ids(sp.get("stop_token_ids") or [], "sampling_params.stop_token_ids"))
    seed = sp.get("sampling_seed", sp.get("seed"))
    if seed is not None:
        kw["seed"] = _get({"seed": seed}, "seed", int, param="sampling_params.sampling_seed")
    lp = _get(body, "return_logprob", bool, False)
    top = _get(body, "top_logprobs_num", int, 0)
    kw.update(logprobs=lp, top_logprobs=top if lp else 0)
    params = _params(kw, {}, "sampling_params.")
    gw.check_prompt(entry, ids, param, params.max_new_tokens, "sampling_params.max_new_tokens")
    req = GenRequest(entry.name, ids, params, _stop(sp, "stop", "sampling_params.stop"),
                     _get(sp, "skip_special_tokens", bool, True, "sampling_params.skip_special_tokens"),
                     request_id=str(body.get("rid") or ""),
                     include_stop_str=bool(sp.get("no_stop_trim", False)))
    return Parsed(req, entry, _get(body, "stream", bool, False), False, top if lp else None)
