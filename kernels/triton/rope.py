"""Rotary embedding in place on q and k (rotate_half / neox style, as transformers Llama),
one token per program, all heads of q and k; fp32 math, one rounding per element.
The cos/sin table is built in torch (reference.rope_cos_sin_cache, which applies
Llama-3.1 'llama3' scaling through services/engine/layers.rope_inv_freq)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, interpreting, check, check_device, next_pow2
from .reference import rope_cos_sin_cache  # noqa: F401  (re-exported: the table is plain torch)


# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()


@triton.jit
def _rotate(X, t, stride_t, stride_h, n_heads, cos, sin, j, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & (j < HALF)[None, :]
    ptr = X + t * stride_t + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, POS, CS, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, H, KVH,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr,
                 BLOCK_KH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(CS + pos * stride_cs + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(CS + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0)[None, :]
    _rotate(Q, t, stride_qt, stride_qh, H, cos, sin, j, HALF, BLOCK_QH)
    _rotate(K, t, stride_kt, stride_kh, KVH, cos, sin, j, HALF, BLOCK_KH)


def apply_rope_(q, k, positions, cos_sin_cache) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place (any token/head strides, e.g. views of
    one fused qkv tensor) at positions int64 [T], with cos_sin_cache fp32 [max_pos, D]."""
    check("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_device("q", q, INTERPRET)
    T, H, D = q.shape
    dev = q.device
    check("k", k, ndim=3, dtypes=(q.dtype,), shape=(T, None, D), device=dev)
    check("positions", positions, ndim=1, dtypes=(torch.int64,), shape=(T,), device=dev)
    check("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), shape=(None, D), device=dev)
    if D % 2:
        raise ValueError(f"q's head dim {D} must be even for rotary embedding")
    if T == 0:
        return
    half = D // 2
    _rope_kernel[(T,)](
        q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), H, k.shape[1],
        HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_QH=next_pow2(H), BLOCK_KH=next_pow2(k.shape[1]),
        num_warps=4)
