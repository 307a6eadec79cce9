"""Write the new tokens' K/V into the paged cache: one token per program; slot -1 skips
(the padding rows of a CUDA-graph batch)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, interpreting, check, check_device, next_pow2


# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()


@triton.jit
def _store_kv_kernel(K, V, KC, VC, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcs, stride_kch, stride_vcs, stride_vch,
                     KVH, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < KVH)[:, None] & (d < D)[None, :] & (slot >= 0)
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(KC + slot * stride_kcs + h[:, None] * stride_kch + d[None, :], k.to(KC.dtype.element_ty), mask=mask)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(VC + slot * stride_vcs + h[:, None] * stride_vch + d[None, :], v.to(VC.dtype.element_ty), mask=mask)


def store_kv(k, v, k_cache, v_cache, slots) -> None:
    """k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t] for k, v [T, KVH, D] (any token/head
    strides), caches [S, KVH, D], slots int64 [T]; slot -1 leaves the caches untouched."""
    check("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    check_device("k", k, INTERPRET)
    T, KVH, D = k.shape
    dev = k.device
    check("v", v, ndim=3, dtypes=FLOAT_DTYPES, shape=(T, KVH, D), device=dev)
    check("k_cache", k_cache, ndim=3, dtypes=FLOAT_DTYPES, shape=(None, KVH, D), device=dev)
    check("v_cache", v_cache, ndim=3, dtypes=FLOAT_DTYPES, shape=k_cache.shape, device=dev)
    check("slots", slots, ndim=1, dtypes=(torch.int64,), shape=(T,), device=dev)
    if T == 0:
        return
    block_h, block_d = next_pow2(KVH), next_pow2(D)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), KVH, D,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=min(max(block_h * block_d // 256, 1), 8))
