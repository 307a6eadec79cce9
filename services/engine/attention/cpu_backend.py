"""CPU backend: the torch backend, with decode attention read in place from
the paged pool by a C++ kernel instead of gathered into a padded copy."""
from __future__ import annotations

import torch

from kernels import cpu as cpu_kernels

from .base import register_backend
from .torch_backend import TorchAttentionBackend, TorchMeta


@register_backend("cpu")
class CpuAttentionBackend(TorchAttentionBackend):
    def _build_decode(self, meta: TorchMeta, rows: list[int], slots: list[torch.Tensor]) -> None:
        super()._build_decode(meta, rows, slots)
        meta.decode_lens = torch.tensor([len(x) for x in slots], dtype=torch.int64)

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: TorchMeta) -> torch.Tensor:
        return cpu_kernels.decode_attention(q.contiguous(), kc, vc, meta.decode_idx, meta.decode_lens, self.scale)
