"""fp32 matmuls on GGUF-quantized weights for CPU decode (qgemv.cpp, AVX2 + FMA + F16C).

A model converted from a GGUF file holds the dequantized blocks in fp32
(services/engine/gguf_convert.py). These kernels read the blocks themselves,
5 bits a weight for Q4_0/Q4_1 and 8.5 for Q8_0 instead of 32, and multiply
weights bit-identical to the fp32 ones. Decode steps read every weight once
per step, so they move up to 6x fewer bytes; prefill keeps the fp32 copy
(its GEMM is compute-bound).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _ext, available  # noqa: F401  (available: the kernels are built)

ROWS = 8                      # output rows per packed panel
BLOCK = 32                    # GGUF block length along K
# GGML type id (gguf.GGMLQuantizationType) -> (name, bits, bytes per block of 32)
GGML_TYPES = {2: ("Q4_0", 4, 18), 3: ("Q4_1", 4, 20), 8: ("Q8_0", 8, 34)}


@dataclass(frozen=True)
class QuantWeight:
    """A [n, k] weight repacked for qgemv: `data` uint8 panels, `bits` 4 or 8."""
    data: torch.Tensor
    n: int
    k: int
    bits: int

    def cat(self, *others: "QuantWeight") -> "QuantWeight":
        """The rows of self, then of others (same k and bits): a fused projection."""
        parts = (self, *others)
        if len({(p.k, p.bits) for p in parts}) != 1:
            raise ValueError("only weights of one k and one bit width concatenate")
        return QuantWeight(torch.cat([p.data for p in parts]), sum(p.n for p in parts), self.k, self.bits)


def supported(ggml_type: int, n: int, k: int) -> bool:
    return ggml_type in GGML_TYPES and n % ROWS == 0 and k % BLOCK == 0


def pack(blocks: np.ndarray, ggml_type: int, n: int, k: int) -> QuantWeight:
    """GGUF blocks of a [n, k] weight (uint8, n rows of k / 32 blocks, rows in the
    model's order) -> the panel layout qgemv reads."""
    raw = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1))
    return QuantWeight(_ext().pack_q(raw, n, k, ggml_type), n, k, GGML_TYPES[ggml_type][1])


def qgemv(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [M, k] fp32 @ W[n, k]^T -> [M, n] fp32."""
    return _ext().qgemv(x.contiguous(), w.data, w.n, w.bits)


def dequantize(w: QuantWeight) -> torch.Tensor:
    """The fp32 [n, k] weight a QuantWeight holds, computed as gguf does (d * q + m):
    the reference the tests hold the kernel to."""
    kb, p = w.k // BLOCK, w.n // ROWS
    per = (32 + 16 * ROWS) if w.bits == 4 else (16 + 32 * ROWS)
    b = w.data.numpy().reshape(p, kb, per)
    d = b[..., :16].copy().view(np.float16).astype(np.float32)             # [p, kb, 8]
    if w.bits == 4:
        m = b[..., 16:32].copy().view(np.float16).astype(np.float32)
        qs = b[..., 32:].reshape(p, kb, 16, ROWS)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)   # [p, kb, 32, 8]
        vals = d[:, :, None, :] * q + m[:, :, None, :]
    else:
        q = b[..., 16:].reshape(p, kb, 32, ROWS).view(np.int8).astype(np.float32)
        vals = q * d[:, :, None, :]
    return torch.from_numpy(np.ascontiguousarray(vals.transpose(0, 3, 1, 2)).reshape(w.n, w.k))
