"""Per-request sampling parameters, with OpenAI / vLLM semantics.

`SamplingParams` is plain frozen data; `validate()` checks it once when the
request enters the engine (the vocabulary size is only known there), and
the sampler trusts it afterwards.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

# A temperature at or below this samples greedily: dividing logits by a
# near-zero temperature overflows float32 and the result is argmax anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63


class SamplingParamsError(ValueError):
    """A bad sampling parameter; `.field` names it (for the API's error body)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = -1                    # -1 or 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0    # HF: over prompt + output tokens
    frequency_penalty: float = 0.0     # OpenAI: over output tokens, per count
    presence_penalty: float = 0.0      # OpenAI: over output tokens, once
    seed: int | None = None
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        # Lists arrive from JSON; keep the dataclass hashable.
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamplingParams":
        """Build and validate (without a vocabulary size) from a plain mapping."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SamplingParamsError(unknown[0], f"unknown sampling parameter(s): {', '.join(unknown)}")
        params = cls(**d)
        params.validate()
        return params

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise SamplingParamsError naming the first bad field; return self."""
        _check_float("temperature", self.temperature, lo=0.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_int("top_k", self.top_k, lo=-1)
        _check_int("max_new_tokens", self.max_new_tokens, lo=1)
        _check_int("min_new_tokens", self.min_new_tokens, lo=0, hi=self.max_new_tokens)
        _check_int("top_logprobs", self.top_logprobs, lo=0, hi=MAX_TOP_LOGPROBS)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=MAX_SEED - 1)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("logprobs", self.logprobs)
        if self.top_logprobs and not self.logprobs:
            raise SamplingParamsError("top_logprobs", "top_logprobs requires logprobs=True")
        self._check_stop_ids(vocab_size)
        return self

    def _check_stop_ids(self, vocab_size: int | None):
        if not isinstance(self.stop_token_ids, tuple):
            raise SamplingParamsError("stop_token_ids", "stop_token_ids must be a tuple of ints, "
                                      f"got {type(self.stop_token_ids).__name__}")
        hi = None if vocab_size is None else vocab_size - 1
        for tok in self.stop_token_ids:
            _check_int("stop_token_ids", tok, lo=0, hi=hi)


def _fail(name: str, value: Any, rule: str):
    raise SamplingParamsError(name, f"{name} must be {rule}, got {value!r}")


def _check_bool(name: str, value: Any):
    if not isinstance(value, bool):
        _fail(name, value, "a bool")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "an int")
    if value < lo:
        _fail(name, value, f">= {lo}")
    if hi is not None and value > hi:
        _fail(name, value, f"<= {hi}")


def _check_float(name: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "a number")
    if not math.isfinite(value):
        _fail(name, value, "finite")
    if value < lo or (lo_open and value == lo):
        _fail(name, value, f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None and value > hi:
        _fail(name, value, f"<= {hi:g}")
