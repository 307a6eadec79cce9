"""The grpc KV transfer backend (chunking, layout checks) and stop strings."""
from __future__ import annotations

import pytest
import torch

from services.gateway.stop_strings import StopStrings
from services.transfer import KvLayout, TransferError, get_backend


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_grpc_backend_round_trip_in_chunks(dtype):
    lay = KvLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype)
    backend = get_backend("grpc", lay, chunk_bytes=lay.bytes_per_token * 4 + 1)
    kv = torch.randn(10, 3, 2, 2, 8).to(getattr(torch, dtype))
    chunks = list(backend.send(kv, 32, backend.descriptor()))
    assert [c.num_tokens for c in chunks] == [4, 4, 2] and [c.start for c in chunks] == [32, 36, 40]
    assert all(len(c.data) <= backend.chunk_bytes for c in chunks)
    parts = [backend.receive(c) for c in chunks]
    assert torch.equal(torch.cat([p for _, p in parts]), kv)


def test_grpc_backend_refuses_foreign_layouts():
    lay = KvLayout(3, 2, 8, "bfloat16")
    chunk = next(get_backend("grpc", KvLayout(4, 2, 8, "bfloat16")).send(
        torch.zeros(2, 4, 2, 2, 8, dtype=torch.bfloat16), 0, get_backend("grpc", lay).descriptor()))
    with pytest.raises(TransferError, match="layout"):
        get_backend("grpc", lay).receive(chunk)
    with pytest.raises(ValueError, match="unknown"):
        get_backend("nope", lay)


def _run(stops, pieces, include=False):
    s, out = StopStrings(tuple(stops), include), []
    for i, p in enumerate(pieces):
        text, hit = s.feed(p, final=i == len(pieces) - 1)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out), False


def test_stop_strings():
    assert _run(["END"], ["Hello E", "N", "D more"]) == ("Hello ", True)
    assert _run(["END"], ["Hello E", "N", "D more"], include=True) == ("Hello END", True)
    assert _run(["\n\n", "##"], ["a\n", "b#", "#c"]) == ("a\nb", True)
    assert _run(["xyz"], ["abc x", "y"]) == ("abc xy", False)          # held text comes out at the end
    s = StopStrings(("abc",))
    assert s.feed("zzab") == ("zz", False)                              # only a possible start is held
    assert s.feed("d") == ("abd", False)
