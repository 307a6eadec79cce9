"""Paged extend (prefill) attention: the new tokens of several sequences, causal, over
each sequence's cached prefix plus themselves, all read through the page table.

Grid (H, cdiv(max_q_len, BLOCK_M), B), heads fastest so the q heads of one KV
group run side by side and share its K/V blocks in L2. A program holds
BLOCK_M new tokens of one head and walks the keys in two loops: keys that every
one of its tokens sees (no mask), then the diagonal blocks (causal mask).
Programs past the end of a shorter sequence do no work.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_int, interpreting, next_pow2

LOG2E = 1.4426950408889634


# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()


@triton.jit
def _attend_block(q, k_base, v_base, PT, n0, page_size, stride_ks, stride_vs, q_pos, kv_end,
                  m, l, acc, qk_scale, d_mask,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        n_mask = pos < kv_end
    else:
        n_mask = pos >= 0
    page = tl.load(PT + pos // page_size, mask=n_mask, other=0)
    slot = page.to(tl.int64) * page_size + pos % page_size
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + slot[:, None] * stride_ks, mask=nd_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(v_base + slot[:, None] * stride_vs, mask=nd_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _extend_kernel(Q, K, V, O, PT, QS, PL, SL,
                   stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt,
                   stride_ot, stride_oh, qk_scale, page_size,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    h = tl.program_id(0)
    mb = tl.program_id(1)
    b = tl.program_id(2)
    q_lo = tl.load(QS + b)
    n_new = tl.load(QS + b + 1) - q_lo
    prefix = tl.load(PL + b)
    seq_len = tl.load(SL + b)
    kvh = h // G

    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < n_new
    d_mask = d < D
    rows = (q_lo + i).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=i_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + i

    active = mb * BLOCK_M < n_new
    kv_end = tl.where(active, tl.minimum(prefix + tl.minimum(n_new, (mb + 1) * BLOCK_M), seq_len), 0)
    # keys below the block's first position are visible to all its rows
    full_end = tl.where(active, (prefix + mb * BLOCK_M) // BLOCK_N * BLOCK_N, 0)
    full_end = tl.minimum(full_end, kv_end)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + kvh * stride_kh + d[None, :]
    v_base = V + kvh * stride_vh + d[None, :]
    pt = PT + b * stride_pt
    for n0 in range(0, full_end, BLOCK_N):
        m, l, acc = _attend_block(q, k_base, v_base, pt, n0, page_size, stride_ks, stride_vs, q_pos,
                                  kv_end, m, l, acc, qk_scale, d_mask,
                                  BLOCK_N=BLOCK_N, MASKED=False, PRECISION=PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        m, l, acc = _attend_block(q, k_base, v_base, pt, n0, page_size, stride_ks, stride_vs, q_pos,
                                  kv_end, m, l, acc, qk_scale, d_mask,
                                  BLOCK_N=BLOCK_N, MASKED=True, PRECISION=PRECISION)

    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    tl.store(O + rows[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=i_mask[:, None] & d_mask[None, :])


def _config(head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); small blocks under the interpreter so that
    CPU tests cover the unmasked loop, the diagonal and several q blocks."""
    if INTERPRET:
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 2
    return 64, 32, 4, 2


def extend_attention(q, k_cache, v_cache, page_table, q_start, prefix_lens, seq_lens, page_size,
                     scale, max_q_len, *, out=None, block_m=None, block_n=None, num_warps=None,
                     num_stages=None):
    """out [T, H, D]: token i of sequence b (rows q_start[b] + i) attends to positions
    [0, prefix_lens[b] + i], K/V (new tokens' included) read through page_table.
    max_q_len (a host int, >= every sequence's new-token count) sizes the grid."""
    check("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_device("q", q, INTERPRET)
    T, H, D = q.shape
    dev = q.device
    check("k_cache", k_cache, ndim=3, dtypes=(q.dtype,), shape=(None, None, D), device=dev)
    KVH = k_cache.shape[1]
    check("v_cache", v_cache, ndim=3, dtypes=(q.dtype,), shape=k_cache.shape, device=dev)
    if H % KVH:
        raise ValueError(f"q has {H} heads, not a multiple of the {KVH} KV heads of k_cache")
    check("page_table", page_table, ndim=2, dtypes=(torch.int32,), device=dev)
    B = page_table.shape[0]
    check("q_start", q_start, ndim=1, dtypes=(torch.int32,), shape=(B + 1,), device=dev)
    check("prefix_lens", prefix_lens, ndim=1, dtypes=(torch.int32,), shape=(B,), device=dev)
    check("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), shape=(B,), device=dev)
    check_int("page_size", page_size, 1)
    check_int("max_q_len", max_q_len, 0)
    if out is None:
        out = torch.empty(T, H, D, dtype=q.dtype, device=dev)
    else:
        check("out", out, ndim=3, dtypes=(q.dtype,), shape=(T, H, D), device=dev)
    if T == 0 or B == 0 or max_q_len == 0:
        return out
    bm, bn, warps, stages = _config(D)
    bm, bn = block_m or bm, block_n or bn
    grid = (H, triton.cdiv(max_q_len, bm), B)
    _extend_kernel[grid](
        q, k_cache, v_cache, out, page_table, q_start, prefix_lens, seq_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1), scale * LOG2E, page_size,
        G=H // KVH, D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, next_pow2(D)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or warps, num_stages=num_stages or stages)
    return out
