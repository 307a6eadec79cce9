"""Protobuf <-> engine dataclasses for the worker (the only module that does it)."""
from __future__ import annotations

from services.engine.radix_cache import CLEARED, REMOVED, STORED, KVEvent
from tandem.v1 import common_pb2, worker_pb2

_KIND = {STORED: worker_pb2.KvEvent.STORED, REMOVED: worker_pb2.KvEvent.REMOVED,
         CLEARED: worker_pb2.KvEvent.CLEARED}


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
