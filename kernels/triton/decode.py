"""Paged decode attention (one new token per sequence), flash-decoding style.

Stage 1, grid (B, KVH, num_splits): a program takes the whole group of q heads
that share one KV head (padded to 16 rows for tl.dot), so each K/V row is read
from HBM once per group, and walks its slice of the context in BLOCK_N-token
blocks gathered through the page table (any page_size), with fp32 online
softmax. Stage 2, grid (B, H), merges the splits' partial outputs by their
log-sum-exp. With one split, stage 1 writes the output directly.

num_splits depends only on shapes (B, KVH, the page table's width) and the SM
count, never on seq_lens, so a captured CUDA graph replays the same grid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_int, interpreting, next_pow2, sm_count

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256      # a split shorter than this costs more in stage 2 than it gains
MAX_SPLITS = 32


# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()


@triton.jit
def _decode_stage1(Q, K, V, PT, SL, O, MID_O, MID_L,
                   stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt,
                   stride_ob, stride_oh, stride_mb, stride_mh, stride_ms,
                   qk_scale, page_size, num_splits,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SL + b)
    split_len = ((seq_len + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g
    gd_mask = (g < G)[:, None] & (d < D)[None, :]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = K + kvh * stride_kh + d[None, :]
    v_base = V + kvh * stride_vh + d[None, :]
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        page = tl.load(PT + b * stride_pt + pos // page_size, mask=n_mask, other=0)
        slot = page.to(tl.int64) * page_size + pos % page_size
        nd_mask = n_mask[:, None] & (d < D)[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale       # [G, N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vs, mask=nd_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    nonempty = l > 0.0            # a split past the end of a short sequence holds nothing
    l_safe = tl.where(nonempty, l, 1.0)
    out = acc / l_safe[:, None]
    if DIRECT:          # one split: no merge pass
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=gd_mask)
    else:
        mid = b * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(MID_O + mid[:, None] + d[None, :], out, mask=gd_mask)
        tl.store(MID_L + mid // BLOCK_D, tl.where(nonempty, m + tl.log2(l_safe), float("-inf")), mask=g < G)


@triton.jit
def _decode_stage2(MID_O, MID_L, O, stride_mb, stride_mh, stride_ms, stride_ob, stride_oh, num_splits,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = b * stride_mb + h * stride_mh + s * stride_ms
    lse = tl.load(MID_L + base // BLOCK_D, mask=s < num_splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))        # split 0 is never empty (seq_len >= 1)
    parts = tl.load(MID_O + base[:, None] + d[None, :], mask=(s < num_splits)[:, None] & (d < D)[None, :],
                    other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d < D)


def default_num_splits(batch: int, num_kv_heads: int, max_pages: int, page_size: int,
                       device: torch.device) -> int:
    """Context splits so that stage 1 has about 4 programs per SM, each of at least
    MIN_SPLIT_TOKENS of the longest context the page table can describe."""
    programs = batch * num_kv_heads
    want = triton.cdiv(4 * sm_count(device), programs)
    most = triton.cdiv(max_pages * page_size, MIN_SPLIT_TOKENS)
    return max(1, min(want, most, MAX_SPLITS))


def _config(head_dim: int, splits: int, elem_bytes: int):
    """(BLOCK_N, num_warps, num_stages). Small blocks under the interpreter so that CPU
    tests cover several blocks per split. An unsplit launch (big batches, as in the
    throughput runs' decode steps, or contexts of at most MIN_SPLIT_TOKENS) of 16-bit K/V
    with head_dim <= 128 reads 128-token blocks in 3 stages: at batch 512 x contexts
    1024-2047 that reads at 93.7% of the read bandwidth on an H200 against 92.4% for
    (64, 4, 2), 94.7% against 94.3% on an H100 (gpu_kernels.py --serving;
    gpu_h200_decode_serving.json, gpu_h100_serving_kernels.json). fp32 keeps the smaller
    blocks: 3 stages of them would need 145 KiB of shared memory, over what sm_86/89 give."""
    if INTERPRET:
        return 16, 1, 1
    if head_dim > 128:
        return 32, 4, 2
    return (128, 4, 3) if splits == 1 and elem_bytes <= 2 else (64, 4, 2)


def decode_attention(q, k_cache, v_cache, page_table, seq_lens, page_size, scale, *,
                     out=None, num_splits=None, block_n=None, num_warps=None, num_stages=None):
    """out [B, H, D] = softmax(q K^T * scale) V over positions [0, seq_lens[b]) of each
    sequence, K/V read through page_table from the paged caches [S, KVH, D].
    block_n / num_warps / num_stages override the launch config (benchmarks)."""
    check("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_device("q", q, INTERPRET)
    B, H, D = q.shape
    dev = q.device
    check("k_cache", k_cache, ndim=3, dtypes=(q.dtype,), shape=(None, None, D), device=dev)
    KVH = k_cache.shape[1]
    check("v_cache", v_cache, ndim=3, dtypes=(q.dtype,), shape=k_cache.shape, device=dev)
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must have the same strides ({k_cache.stride()} vs {v_cache.stride()})")
    if H % KVH:
        raise ValueError(f"q has {H} heads, not a multiple of the {KVH} KV heads of k_cache")
    check("page_table", page_table, ndim=2, dtypes=(torch.int32,), shape=(B, None), device=dev)
    check("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), shape=(B,), device=dev)
    check_int("page_size", page_size, 1)
    if out is None:
        out = torch.empty(B, H, D, dtype=q.dtype, device=dev)
    else:
        check("out", out, ndim=3, dtypes=(q.dtype,), shape=(B, H, D), device=dev)
    if B == 0:
        return out
    splits = num_splits or default_num_splits(B, KVH, page_table.shape[1], page_size, dev)
    check_int("num_splits", splits, 1)
    bn, warps, stages = _config(D, splits, q.element_size())
    bn, warps, stages = block_n or bn, num_warps or warps, num_stages or stages
    G = H // KVH
    BLOCK_D = max(16, next_pow2(D))
    if splits > 1:
        mid_o = torch.empty(B, H, splits, BLOCK_D, dtype=torch.float32, device=dev)
        mid_l = torch.empty(B, H, splits, dtype=torch.float32, device=dev)
    else:
        mid_o = mid_l = out          # unused
    ms = (H * splits * BLOCK_D, splits * BLOCK_D, BLOCK_D)   # mid_l's strides are these / BLOCK_D
    _decode_stage1[(B, KVH, splits)](
        q, k_cache, v_cache, page_table, seq_lens, out, mid_o, mid_l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1), *ms,
        scale * LOG2E, page_size, splits,
        G=G, D=D, BLOCK_G=max(16, next_pow2(G)), BLOCK_N=bn, BLOCK_D=BLOCK_D,
        DIRECT=splits == 1, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    if splits > 1:
        _decode_stage2[(B, H)](
            mid_o, mid_l, out, *ms, out.stride(0), out.stride(1), splits,
            D=D, BLOCK_D=BLOCK_D, BLOCK_S=max(2, next_pow2(splits)), num_warps=4)
    return out
