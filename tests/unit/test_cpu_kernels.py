"""The C++ CPU kernels (kernels/cpu) against their torch references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu as K
from services.engine.layers import RMSNorm, RotaryEmbedding

pytestmark = pytest.mark.skipif(not K.available(), reason="CPU kernels need AVX2 (or AVX-512) and a compiler")
needs_bf16 = pytest.mark.skipif(not K.has_bf16_gemv(), reason="the bf16 matmul needs AVX-512 BF16")
DTYPES = [torch.float32, torch.bfloat16]


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@needs_bf16
@pytest.mark.parametrize("n, k", [(16, 32), (32, 2), (960, 576), (576, 1536), (1040, 64), (976, 96)])
def test_gemv_bf16(n, k):
    """Every M of the decode range, so full 8-token tiles and each tail (1-7 tokens), and
    panels of 48 columns with tails of 16 (976) and 32 (1040, 32)."""
    torch.manual_seed(n + k)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    packed = K.pack_bf16(w)
    for m in range(1, 71):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        ref = x.float() @ w.float().t()     # bf16 products are exact in fp32: only sums reorder
        out = K.gemv_bf16(x, packed)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        torch.testing.assert_close(out.float(), ref, atol=1e-3 * ref.abs().max().item(), rtol=4e-3,
                                   msg=lambda s: f"m={m}: {s}")


@needs_bf16
def test_gemv_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="multiple"):
        K.pack_bf16(torch.randn(24, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="multiple"):
        K.pack_bf16(torch.randn(16, 33, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        K.gemv_bf16(torch.randn(2, 64, dtype=torch.bfloat16), K.pack_bf16(torch.randn(16, 32, dtype=torch.bfloat16)))
    with pytest.raises(RuntimeError, match="contiguous"):
        K.gemv_bf16(torch.randn(32, 2, dtype=torch.bfloat16).t(), K.pack_bf16(torch.randn(16, 32, dtype=torch.bfloat16)))
    with pytest.raises(RuntimeError, match="bf16"):
        K.gemv_bf16(torch.randn(2, 32), K.pack_bf16(torch.randn(16, 32, dtype=torch.bfloat16)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
def test_decode_attention(dtype, heads, kv_heads, d):
    torch.manual_seed(heads + d)
    S, lens = 2048, torch.tensor([1, 9, 100, 333])
    kc, vc = torch.randn(S, kv_heads, d, dtype=dtype), torch.randn(S, kv_heads, d, dtype=dtype)
    slots = torch.zeros(len(lens), int(lens.max()), dtype=torch.int64)
    for b, n in enumerate(lens.tolist()):
        slots[b, :n] = torch.randperm(S - 1)[:n] + 1
    q = torch.randn(len(lens), heads, d, dtype=dtype)
    out = K.decode_attention(q, kc, vc, slots, lens, d ** -0.5)
    for b, n in enumerate(lens.tolist()):
        k, v = kc[slots[b, :n]].float().transpose(0, 1), vc[slots[b, :n]].float().transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[b].float().unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
        close(out[b], ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_add_rmsnorm(dtype, rows):
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = torch.randn(576, dtype=dtype)
    x, res = torch.randn(rows, 576, dtype=dtype), torch.randn(rows, 576, dtype=dtype)
    out, new_res = K.add_rmsnorm(x, res, norm.weight, norm.eps)
    close(new_res, x + res, dtype)
    close(out, norm(x + res), dtype)
    out0, res0 = K.add_rmsnorm(x, None, norm.weight, norm.eps)
    assert torch.equal(res0, x)
    close(out0, norm(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place(dtype):
    torch.manual_seed(0)
    rot = RotaryEmbedding(64, 512, 10000.0, None)
    x = torch.randn(7, 12, 80, dtype=dtype)[:, :, :64].contiguous()
    pos = torch.tensor([0, 1, 5, 100, 200, 300, 511])
    cos, sin = rot.cos[pos].to(dtype).unsqueeze(1), rot.sin[pos].to(dtype).unsqueeze(1)
    ref = torch.addcmul(x * cos, x.roll(32, dims=-1), sin)
    y = x.clone()
    K.rope_(y, pos, rot.cos, rot.sin)
    close(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gu = torch.randn(5, 2 * 1536, dtype=dtype)
    g, u = gu.split(1536, dim=-1)
    close(K.silu_mul(gu), F.silu(g) * u, dtype)


def test_a_stale_build_lock_is_removed(tmp_path):
    """torch's build lock left by a killed build would make every later load wait forever;
    under the build's own flock a leftover `lock` file is known stale and removed."""
    import kernels.cpu as kc
    (tmp_path / "lock").write_text("")
    with kc._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    with kc._build_lock(tmp_path):                 # released on exit: it can be taken again
        pass
