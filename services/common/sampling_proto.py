"""SamplingParams <-> tandem.v1.SamplingParams, shared by the gateway and the workers."""
from __future__ import annotations

from tandem.v1 import common_pb2

from .sampling_params import SamplingParams

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
             "presence_penalty", "seed")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


def from_proto(sp: common_pb2.SamplingParams, default_max_new_tokens: int | None = None) -> SamplingParams:
    """Validated SamplingParams; unset optional fields keep their defaults
    (SamplingParamsError names the field at fault)."""
    kw = {name: getattr(sp, name) for name in _OPTIONAL if sp.HasField(name)}
    for name in _FLOATS:
        if name in kw:                      # float32 on the wire: 0.7 -> 0.699999988
            kw[name] = round(kw[name], 6)
    if sp.HasField("max_new_tokens"):
        kw["max_new_tokens"] = sp.max_new_tokens
    elif default_max_new_tokens is not None:
        kw["max_new_tokens"] = default_max_new_tokens
    return SamplingParams(min_new_tokens=sp.min_new_tokens, stop_token_ids=tuple(sp.stop_token_ids),
                          ignore_eos=sp.ignore_eos, logprobs=sp.logprobs, top_logprobs=sp.top_logprobs,
                          **kw).validate()


def to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                                    stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
                                    logprobs=p.logprobs, top_logprobs=p.top_logprobs)
    for name in _OPTIONAL:
        v = getattr(p, name)
        if v is not None:
            setattr(msg, name, v)
    return msg
