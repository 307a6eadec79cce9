"""The one forward context: what every layer of one forward pass may read.

Set by the runner around a forward with `forward_context(ctx)`; attention
layers read it with `current()`. Nothing else is global.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class ForwardContext:
    out_slots: torch.Tensor          # [T] KV slot of each new token
    attn_meta: Any                   # the attention backend's per-forward metadata
    backend: Any                     # the AttentionBackend instance


_CURRENT: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CURRENT
    prev, _CURRENT = _CURRENT, ctx
    try:
        yield ctx
    finally:
        _CURRENT = prev


def current() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("attention called outside forward_context()")
    return _CURRENT
