"""kernels/cpu/quant: fp32 matmuls on GGUF blocks, against gguf's own dequantization."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kernels import cpu as K
from kernels.cpu import quant

pytestmark = pytest.mark.skipif(not K.available(), reason="CPU kernels need AVX2 (or AVX-512) and a compiler")


def _blocks(qtype: "gguf.GGMLQuantizationType", n: int, k: int, seed: int) -> np.ndarray:
    """Real GGUF blocks of a random [n, k] weight (gguf's own quantizer)."""
    from gguf.quants import quantize
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return quantize(w, qtype).reshape(n, -1)


QTYPES = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n, k", [(8, 32), (40, 64), (576, 576), (192, 1536)])
def test_packed_weights_are_ggufs_dequantization_bit_for_bit(qtype, n, k):
    from gguf.quants import dequantize
    blocks = _blocks(qtype, n, k, n + k)
    qw = quant.pack(blocks, int(qtype), n, k)
    ref = dequantize(blocks, qtype).reshape(n, k)
    assert np.array_equal(quant.dequantize(qw).numpy(), ref)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n, k", [(8, 32), (40, 64), (960, 576), (576, 1536)])
def test_qgemv_matches_the_fp32_matmul(qtype, n, k):
    """Every M of the decode range: full 8-token tiles and each tail, one panel and
    groups of 4 panels with a remainder (M = 1)."""
    from gguf.quants import dequantize
    blocks = _blocks(qtype, n, k, n * k)
    qw = quant.pack(blocks, int(qtype), n, k)
    w = torch.from_numpy(dequantize(blocks, qtype).reshape(n, k).copy())
    for m in list(range(1, 18)) + [32]:
        x = torch.randn(m, k)
        ref = (x.double() @ w.double().t())
        out = quant.qgemv(x, qw)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        torch.testing.assert_close(out.double(), ref, atol=2e-6 * ref.abs().max().item(), rtol=1e-5,
                                   msg=lambda s: f"m={m}: {s}")


def test_fused_rows_concatenate():
    a = quant.pack(_blocks(gguf.GGMLQuantizationType.Q4_1, 16, 64, 1), 3, 16, 64)
    b = quant.pack(_blocks(gguf.GGMLQuantizationType.Q4_1, 8, 64, 2), 3, 8, 64)
    ab = a.cat(b)
    assert (ab.n, ab.k) == (24, 64)
    assert torch.equal(quant.dequantize(ab), torch.cat([quant.dequantize(a), quant.dequantize(b)]))
    with pytest.raises(ValueError):
        a.cat(quant.pack(_blocks(gguf.GGMLQuantizationType.Q8_0, 8, 64, 3), 8, 8, 64))


def test_bad_input_is_refused():
    qw = quant.pack(_blocks(gguf.GGMLQuantizationType.Q8_0, 8, 64, 4), 8, 8, 64)
    with pytest.raises(RuntimeError, match="fp32"):
        quant.qgemv(torch.randn(2, 64, dtype=torch.bfloat16), qw)
    with pytest.raises(RuntimeError, match="size"):
        K._ext().qgemv(torch.randn(2, 96), qw.data, 8, 8)
    with pytest.raises(RuntimeError, match="multiple"):
        K._ext().pack_q(torch.zeros(7 * 34, dtype=torch.uint8), 7, 32, 8)
