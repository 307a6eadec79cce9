"""Rotary embedding in place on q and k (rotate_half / neox style, as transformers Llama),
one token per program, all heads of q and k; fp32 math, one rounding per element.
Optionally the same program also writes the rotated k and v into the paged KV caches
(what store_kv does): one kernel a layer fewer, and at batch 1 a layer's small
kernels are what keeps decode off the HBM roofline. The cos/sin table is built in
torch (reference.rope_cos_sin_cache, which applies Llama-3.1 'llama3' scaling through
services/engine/layers.rope_inv_freq)."""
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
    r1 = (x1 * cos - x2 * sin).to(X.dtype.element_ty)
    r2 = (x2 * cos + x1 * sin).to(X.dtype.element_ty)
    tl.store(ptr, r1, mask=mask)
    tl.store(ptr + HALF, r2, mask=mask)
    return r1, r2


@triton.jit
def _rope_kernel(Q, K, POS, CS, V, KC, VC, SLOTS, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                 stride_vt, stride_vh, stride_kcs, stride_kch, stride_vcs, stride_vch, H, KVH,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr,
                 BLOCK_KH: tl.constexpr, STORE: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(CS + pos * stride_cs + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(CS + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0)[None, :]
    _rotate(Q, t, stride_qt, stride_qh, H, cos, sin, j, HALF, BLOCK_QH)
    k1, k2 = _rotate(K, t, stride_kt, stride_kh, KVH, cos, sin, j, HALF, BLOCK_KH)
    if STORE:                    # the rotated k and v into the paged caches (slot -1: nowhere)
        slot = tl.load(SLOTS + t)
        h = tl.arange(0, BLOCK_KH)
        mask = (h < KVH)[:, None] & (j < HALF)[None, :] & (slot >= 0)
        kc = KC + slot * stride_kcs + h[:, None] * stride_kch + j[None, :]
        tl.store(kc, k1.to(KC.dtype.element_ty), mask=mask)
        tl.store(kc + HALF, k2.to(KC.dtype.element_ty), mask=mask)
        d = tl.arange(0, BLOCK_D)
        vmask = (h < KVH)[:, None] & (d < 2 * HALF)[None, :] & (slot >= 0)
        v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=vmask)
        tl.store(VC + slot * stride_vcs + h[:, None] * stride_vch + d[None, :], v.to(VC.dtype.element_ty),
                 mask=vmask)


def apply_rope_(q, k, positions, cos_sin_cache, kv_store=None) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place (any token/head strides, e.g. views of
    one fused qkv tensor) at positions int64 [T], with cos_sin_cache fp32 [max_pos, D].
    kv_store = (v, k_cache, v_cache, slots): also write the rotated k and v [T, KVH, D]
    into the caches [S, KVH, D] at slots int64 [T] (-1: nowhere), as store_kv would, in
    the same kernel."""
    check("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_device("q", q, INTERPRET)
    T, H, D = q.shape
    dev = q.device
    check("k", k, ndim=3, dtypes=(q.dtype,), shape=(T, None, D), device=dev)
    KVH = k.shape[1]
    check("positions", positions, ndim=1, dtypes=(torch.int64,), shape=(T,), device=dev)
    check("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), shape=(None, D), device=dev)
    if D % 2:
        raise ValueError(f"q's head dim {D} must be even for rotary embedding")
    if kv_store is not None:
        v, kc, vc, slots = kv_store
        check("v", v, ndim=3, dtypes=(q.dtype,), shape=(T, KVH, D), device=dev)
        check("k_cache", kc, ndim=3, dtypes=FLOAT_DTYPES, shape=(None, KVH, D), device=dev)
        check("v_cache", vc, ndim=3, dtypes=FLOAT_DTYPES, shape=kc.shape, device=dev)
        check("slots", slots, ndim=1, dtypes=(torch.int64,), shape=(T,), device=dev)
        store = (v, kc, vc, slots, v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1))
    else:
        store = (q, q, q, positions, 0, 0, 0, 0, 0, 0)           # unread
    if T == 0:
        return
    half = D // 2
    v, kc, vc, slots, *vstrides = store
    _rope_kernel[(T,)](
        q, k, positions, cos_sin_cache, v, kc, vc, slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), *vstrides, H, KVH,
        HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_QH=next_pow2(H), BLOCK_KH=next_pow2(KVH),
        STORE=kv_store is not None, BLOCK_D=next_pow2(D), num_warps=4)
