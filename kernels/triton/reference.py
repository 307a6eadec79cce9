"""Torch references of the Triton kernels: same signatures, same layouts, any device.

They are the specification the kernels are tested against (fp32 math, one
rounding to the output dtype) and the fallback of the triton attention backend
on a device without Triton. They may sync with the host (boolean indexing,
per-sequence loops): never capture them in a CUDA graph.

Layouts: a layer's KV cache is [num_slots, KVH, D] with
slot = page * page_size + offset; page tables are int32 [B, max_pages],
rows padded with page 0 (reserved, zeroed).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _slots(page_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Cache slots of `positions` [B, N] through page_table [B, P] (positions past the table clamp)."""
    page_idx = (positions // page_size).clamp(max=page_table.shape[1] - 1)
    pages = torch.gather(page_table.long(), 1, page_idx)
    return pages * page_size + positions % page_size


def decode_attention(q, k_cache, v_cache, page_table, seq_lens, page_size, scale, *,
                     out=None, num_splits=None):
    """q [B, H, D]: one new token per sequence, attending to positions [0, seq_lens[b])."""
    B, H, D = q.shape
    KVH = k_cache.shape[1]
    max_len = max(int(seq_lens.max()), 1)
    pos = torch.arange(max_len, device=q.device).expand(B, max_len)
    slots = _slots(page_table, pos, page_size)                          # [B, N]
    valid = pos < seq_lens.long()[:, None]                              # [B, N]
    # Slots past a sequence's end may never have been written (garbage, NaN): mask the
    # loads as the kernel does, not only the scores, or 0 * NaN reaches the output.
    keep = valid[:, :, None, None]
    k = k_cache[slots].float().masked_fill(~keep, 0.0)                  # [B, N, KVH, D]
    v = v_cache[slots].float().masked_fill(~keep, 0.0)
    qg = q.float().view(B, KVH, H // KVH, D)
    s = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = torch.einsum("bkgn,bnkd->bkgd", s.softmax(-1), v).reshape(B, H, D)
    return _into(o, q.dtype, out)


def extend_attention(q, k_cache, v_cache, page_table, q_start, prefix_lens, seq_lens, page_size,
                     scale, max_q_len, *, out=None):
    """q [T, H, D]: the new tokens of B sequences; token i of sequence b attends to
    positions [0, prefix_lens[b] + i] (its own K/V is already in the cache)."""
    T, H, D = q.shape
    KVH = k_cache.shape[1]
    o = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    starts, prefixes, lens = q_start.tolist(), prefix_lens.tolist(), seq_lens.tolist()
    for b, (prefix, length) in enumerate(zip(prefixes, lens)):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        pos = torch.arange(length, device=q.device)[None]
        slots = _slots(page_table[b:b + 1], pos, page_size)[0]
        k = k_cache[slots].float().repeat_interleave(H // KVH, dim=1)   # [N, H, D]
        v = v_cache[slots].float().repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("thd,nhd->htn", q[lo:hi].float(), k) * scale
        q_pos = prefix + torch.arange(hi - lo, device=q.device)
        s = s.masked_fill(pos[0][None, :] > q_pos[:, None], float("-inf"))
        o[lo:hi] = torch.einsum("htn,nhd->thd", s.softmax(-1), v)
    return _into(o, q.dtype, out)


def silu_mul(gate_up):
    """silu(gate) * up of gate_up [T, 2I], rounded as layers.GatedMLP's torch path: silu in
    fp32 rounded to the input dtype, then the product in fp32 rounded again."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate).to(gate_up.dtype).float() * up).to(gate_up.dtype)


def fused_add_rmsnorm(x, residual, weight, eps):
    """(weight * rmsnorm(x + residual), x + residual), rounded as transformers' LlamaRMSNorm
    (and services/engine/layers.py): the sum is rounded to x's dtype, normalized in fp32,
    rounded again, then multiplied by the weight."""
    r = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    rf = r.float()
    normed = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight.float() * normed.to(x.dtype).float()).to(x.dtype)
    return y, r


def gemv(x, w, bias=None):
    """x [M, K] @ w [N, K]^T (+ bias): fp32 sums, one rounding."""
    y = x.float() @ w.float().T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def rope_cos_sin_cache(head_dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None,
                       device) -> torch.Tensor:
    """fp32 [max_pos, head_dim]: cos of the head_dim/2 frequencies, then their sin.
    Angles are computed on the CPU in fp32 like RotaryEmbedding, then moved."""
    from services.engine.layers import rope_inv_freq
    inv = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rope_(q, k, positions, cos_sin_cache, kv_store=None) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place (rotate_half style), fp32 math, one rounding;
    kv_store = (v, k_cache, v_cache, slots): then store_kv of the rotated k and v."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x.copy_(rotated.to(x.dtype))
    if kv_store is not None:
        v, k_cache, v_cache, slots = kv_store
        store_kv(k, v, k_cache, v_cache, slots)


def store_kv(k, v, k_cache, v_cache, slots) -> None:
    """k_cache[slots[t]] = k[t] (same for v); rows with slot -1 are skipped."""
    keep = slots >= 0
    k_cache[slots[keep]] = k[keep].to(k_cache.dtype)
    v_cache[slots[keep]] = v[keep].to(v_cache.dtype)


def _into(o: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return o.to(dtype)
    out.copy_(o)
    return out
