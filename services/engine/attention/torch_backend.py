"""Reference attention backend: gathers paged K/V and calls torch SDPA.

Runs on CPU and GPU. Single-token (decode) sequences are batched into one
padded SDPA call; multi-token (prefill/extend) sequences go one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import AttentionBackend, SeqSpec, register_backend


@dataclass
class _Extend:
    row0: int                       # first row of this sequence in the flattened batch
    n: int                          # new tokens
    slots: torch.Tensor | None      # KV slots of [0, start + n); None when start == 0
    mask: torch.Tensor | None       # [n, start + n] bool; None -> plain causal


@dataclass
class TorchMeta:
    decode_rows: torch.Tensor | None = None    # rows of single-token sequences (unless contiguous)
    decode_idx: torch.Tensor | None = None     # [Bd, L] KV slots, padded with slot 0
    decode_mask: torch.Tensor | None = None    # [Bd, 1, 1, L] bool; None if no padding
    decode_lens: torch.Tensor | None = None    # [Bd] valid lengths (backends that read pages in place)
    decode_contiguous: bool = False            # decode rows are exactly 0..Bd-1
    extends: list[_Extend] = field(default_factory=list)


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    def build(self, seqs: Sequence[SeqSpec]) -> TorchMeta:
        meta = TorchMeta()
        dec_rows, dec_slots, row = [], [], 0
        for s in seqs:
            if s.n == 1 and s.start > 0:
                dec_rows.append(row)
                dec_slots.append(s.slots)
            else:
                meta.extends.append(self._extend(row, s))
            row += s.n
        if dec_rows:
            self._build_decode(meta, dec_rows, dec_slots)
        return meta

    def _extend(self, row0: int, s: SeqSpec) -> _Extend:
        if s.start == 0:
            return _Extend(row0, s.n, None, None)
        total = s.start + s.n
        dev = s.slots.device
        q_pos = torch.arange(s.start, total, device=dev)
        mask = torch.arange(total, device=dev)[None, :] <= q_pos[:, None]
        return _Extend(row0, s.n, s.slots, mask)

    def _build_decode(self, meta: TorchMeta, rows: list[int], slots: list[torch.Tensor]) -> None:
        lens = [len(x) for x in slots]
        width = max(lens)
        meta.decode_idx = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)   # pads with slot 0
        if min(lens) != width:
            dev = slots[0].device
            lens_t = torch.tensor(lens, device=dev)
            meta.decode_mask = (torch.arange(width, device=dev)[None, :] < lens_t[:, None])[:, None, None, :]
        meta.decode_contiguous = rows == list(range(len(rows)))
        if not meta.decode_contiguous:
            meta.decode_rows = torch.tensor(rows, dtype=torch.int64, device=slots[0].device)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_slots: torch.Tensor, meta: TorchMeta) -> torch.Tensor:
        self.kv_pool.store(layer, out_slots, k, v)
        kc, vc = self.kv_pool.k_cache[layer], self.kv_pool.v_cache[layer]
        if meta.decode_contiguous and not meta.extends:
            return self._decode(q, kc, vc, meta).reshape(q.shape[0], -1)
        out = torch.empty_like(q)
        if meta.decode_idx is not None:
            rows = slice(0, meta.decode_idx.shape[0]) if meta.decode_contiguous else meta.decode_rows
            out[rows] = self._decode(q[rows], kc, vc, meta)
        for e in meta.extends:
            out[e.row0:e.row0 + e.n] = self._extend_attn(q, k, v, kc, vc, e)
        return out.reshape(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: TorchMeta) -> torch.Tensor:
        keys = kc[meta.decode_idx].transpose(1, 2)        # [B, KVH, L, D]
        vals = vc[meta.decode_idx].transpose(1, 2)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals, attn_mask=meta.decode_mask,
                                           scale=self.scale, enable_gqa=True)
        return o.squeeze(2)                                 # [B, H, D]

    def _extend_attn(self, q, k, v, kc, vc, e: _Extend) -> torch.Tensor:
        qe = q[e.row0:e.row0 + e.n].transpose(0, 1).unsqueeze(0)          # [1, H, n, D]
        if e.slots is None:
            ke, ve = k[e.row0:e.row0 + e.n], v[e.row0:e.row0 + e.n]
        else:
            ke, ve = kc[e.slots], vc[e.slots]
        ke, ve = ke.transpose(0, 1).unsqueeze(0), ve.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=e.mask, is_causal=e.mask is None,
                                           scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)                                         # [n, H, D]
