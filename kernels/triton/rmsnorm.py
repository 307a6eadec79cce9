"""Fused residual add + RMSNorm, one row per program.

Rounding order is transformers' LlamaRMSNorm (and services/engine/layers.py):
residual_out = x + residual rounded to x's dtype; y = weight * (r * rsqrt(mean(r^2) + eps))
where the normalized value is rounded to x's dtype before the weight multiply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, interpreting, check, check_device, next_pow2


# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()


@triton.jit
def _add_rmsnorm_kernel(X, R, W, Y, RO, stride_x, stride_r, stride_y, stride_ro, N, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        r = r.to(X.dtype.element_ty)
        tl.store(RO + row * stride_ro + cols, r, mask=mask)
    else:
        r = x
    rf = r.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(rf * rf, 0) / N + eps)
    normed = (rf * inv).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


def fused_add_rmsnorm(x, residual, weight, eps):
    """(y, residual_out) for x [T, N], residual [T, N] or None (then residual_out is x itself),
    weight [N]; y and residual_out are new tensors in x's dtype."""
    check("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_device("x", x, INTERPRET)
    T, N = x.shape
    if residual is not None:
        check("residual", residual, ndim=2, dtypes=FLOAT_DTYPES, shape=(T, N), device=x.device)
    check("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(N,), device=x.device)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    r_out = x if residual is None else torch.empty_like(y)
    if T == 0:
        return y, r_out
    block = next_pow2(N)
    res = x if residual is None else residual
    _add_rmsnorm_kernel[(T,)](
        x, res, weight, y, r_out, x.stride(0), res.stride(0), y.stride(0), r_out.stride(0), N, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(max(block // 512, 1), 16))
    return y, r_out
