"""Protobuf <-> engine dataclasses for the worker (the only module that does it)."""
from __future__ import annotations

import dataclasses

from services.engine.radix_cache import CLEARED, REMOVED, STORED, KVEvent
from services.engine.sampling_params import SamplingParams
from tandem.v1 import common_pb2, worker_pb2

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
             "presence_penalty", "seed", "max_new_tokens")
_KIND = {STORED: worker_pb2.KvEvent.STORED, REMOVED: worker_pb2.KvEvent.REMOVED,
         CLEARED: worker_pb2.KvEvent.CLEARED}


def sampling_from_proto(sp: common_pb2.SamplingParams) -> SamplingParams:
    """Validated SamplingParams (SamplingParamsError names the field)."""
    kw = {name: getattr(sp, name) for name in _OPTIONAL if sp.HasField(name)}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty"):
        if name in kw:                      # float32 on the wire: 0.7 -> 0.699999988
            kw[name] = round(kw[name], 6)
    return SamplingParams(min_new_tokens=sp.min_new_tokens, stop_token_ids=tuple(sp.stop_token_ids),
                          ignore_eos=sp.ignore_eos, logprobs=sp.logprobs, top_logprobs=sp.top_logprobs,
                          **kw).validate()


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    d = dataclasses.asdict(p)
    if d["seed"] is None:
        del d["seed"]
    d["stop_token_ids"] = list(d["stop_token_ids"])
    return common_pb2.SamplingParams(**d)


def logprobs_to_proto(lps, tops) -> list[common_pb2.TokenLogprob]:
    if not lps:
        return []
    tops = tops or [[]] * len(lps)
    return [common_pb2.TokenLogprob(logprob=lp, top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in top])
            for lp, top in zip(lps, tops)]


def logprob_from_proto(lp: common_pb2.TokenLogprob) -> tuple[float, list[tuple[int, float]]]:
    return lp.logprob, [(t.token_id, t.logprob) for t in lp.top]


def events_to_proto(events: list[KVEvent]) -> list[worker_pb2.KvEvent]:
    out = []
    for e in events:
        msg = worker_pb2.KvEvent(kind=_KIND[e.kind], page_hashes=e.page_hashes)
        if e.parent_hash is not None:
            msg.parent_hash = e.parent_hash
        out.append(msg)
    return out
