"""The gateway's own request/response dataclasses and its one error type.

REST and gRPC both turn their messages into GenRequest and read GenChunk;
nothing below them sees JSON or protobuf.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

from services.common.sampling_params import SamplingParams

_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def new_id() -> str:
    """A request or response id: random per process, then counted (uuid4 reads os.urandom each time)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class ApiError(Exception):
    """An error for the caller: HTTP status, OpenAI error type/code, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        if self.status == 400 or self.status == 422:
            return "invalid_request_error"
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"


@dataclass
class GenRequest:
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    request_id: str = ""
    include_stop_str: bool = False


@dataclass
class GenChunk:
    """New tokens and text since the last chunk; the last one has finish_reason and usage."""
    token_ids: list[int]
    text: str
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
