"""Building blocks shared by the model families: norm, rotary, MLP, linear.

Numerics follow Hugging Face transformers exactly (fp32 norm statistics,
fp32 rotary angles) so that greedy outputs match the reference. On CUDA the
residual add + RMSNorm and the rotary embedding are fused Triton kernels
(kernels/triton), which keep the same roundings up to bf16 ties.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from kernels import cpu as cpu_kernels
from kernels.cpu import quant as quant_kernels

# Up to this many tokens the packed CPU kernel (register-blocked, ~330-400
# GFLOP/s on 2 Zen 4 cores from M = 16) beats oneDNN's GEMM on the plain
# weight (1.1-1.8x at M = 64-128 on SmolLM2's shapes, cold weights,
# benchmarks/results/cpu_gemv.md); prefill chunks above it keep oneDNN.
GEMV_MAX_TOKENS = 128
# Up to this many tokens an fp32 matmul reads the GGUF blocks (kernels/cpu/quant)
# instead of the fp32 weight: bound by the weight bytes below it, by FMAs above.
QGEMV_MAX_TOKENS = 64


# A one-row CUDA matmul (batch-1 decode) is kernels/triton's gemv: 72-100% of the HBM read
# bandwidth on the 8B's matmuls where cuBLAS reaches 56-87% (benchmarks/results/gpu_h200.md).
# From 2 rows on, cuBLAS.
# 0: cuBLAS always (benchmarks/offline.py --no-gemv sets it for an A/B).
GPU_GEMV_MAX_ROWS = 1


def fused_cpu(x: torch.Tensor) -> bool:
    """Use the fused C++ ops: CPU tensors of a supported dtype, kernels built."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available()


def fused_gpu(x: torch.Tensor) -> bool:
    """Use the fused Triton ops: a CUDA tensor, Triton and kernels/triton importable."""
    if not x.is_cuda:
        return False
    from .attention.triton_backend import triton_available
    return triton_available()


def _gpu_ops():
    from kernels import triton as tk
    return tk


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           packed: torch.Tensor | None = None, quant: quant_kernels.QuantWeight | None = None) -> torch.Tensor:
    """F.linear; for few tokens a streaming kernel: on CUDA the Triton gemv, on CPU one on a
    packed bf16 copy of w, or on the GGUF blocks w was dequantized from."""
    if (x.dim() == 2 and x.shape[0] <= GPU_GEMV_MAX_ROWS and w.dtype == x.dtype and x.stride(-1) == 1
            and w.stride(-1) == 1 and fused_gpu(x)):
        return _gpu_ops().gemv(x, w, b)
    if packed is not None and x.shape[0] <= GEMV_MAX_TOKENS and x.dim() == 2:
        y = cpu_kernels.gemv_bf16(x.contiguous(), packed)
        return y if b is None else y + b
    if quant is not None and x.shape[0] <= QGEMV_MAX_TOKENS and x.dim() == 2 and x.dtype == torch.float32:
        y = quant_kernels.qgemv(x, quant)
        return y if b is None else y + b
    return F.linear(x, w, b)


def pack_for_cpu(w: torch.Tensor) -> torch.Tensor | None:
    """A packed copy of a CPU bf16 weight for decode matmuls (None where not applicable).
    The original stays for prefill, where oneDNN's GEMM is compute-bound and faster."""
    return cpu_kernels.pack_bf16(w) if cpu_kernels.can_pack(w) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF: normalize in fp32, cast back, then scale by the weight.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; return (norm(residual), residual). First layer: residual is None."""
    if fused_cpu(x) and x.dim() == 2:
        return cpu_kernels.add_rmsnorm(x.contiguous(), residual, norm.weight, norm.eps)
    if fused_gpu(x) and x.dim() == 2:
        return _gpu_ops().fused_add_rmsnorm(x, residual, norm.weight, norm.eps)
    residual = x if residual is None else residual + x
    return norm(residual), residual


class Linear(nn.Module):
    """y = x W^T (+ b). The one place a faster CPU/GPU matmul can be plugged in."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.packed: torch.Tensor | None = None     # set by prepare() after the weights load
        self.quant: quant_kernels.QuantWeight | None = None   # GGUF blocks of weight (gguf_weights.py)

    def prepare(self) -> None:
        self.packed = pack_for_cpu(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed, self.quant)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one matmul."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter)
        self.down_proj = Linear(inter, hidden)
        self.inter = inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused_cpu(gate_up):
            return self.down_proj(cpu_kernels.silu_mul(gate_up))
        if fused_gpu(gate_up) and gate_up.dim() == 2:
            return self.down_proj(_gpu_ops().silu_mul(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return _llama3_inv_freq(inv, scaling)
    if kind == "linear":
        return inv / scaling["factor"]
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3, linear)")


def _llama3_inv_freq(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling (same formula as transformers)."""
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate_half) rotary embedding with a cos/sin table per position."""

    def __init__(self, head_dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: the sign lives in the table
        sin = emb.sin()
        self.register_buffer("sin", torch.cat([-sin[:, :head_dim // 2], sin[:, head_dim // 2:]], -1),
                             persistent=False)
        self.half = head_dim // 2
        self._rope_args = (head_dim, max_pos, theta, scaling)
        self.gpu_cache: torch.Tensor | None = None     # kernels/triton's table, built on first GPU use

    def prepare(self, positions: torch.Tensor, like: torch.Tensor,
                num_q_heads: int | None = None) -> Callable[..., torch.Tensor]:
        """Once per forward: a function rope(x, kv_store=None) that rotates x [T, heads, D] at
        `positions` (on CUDA in place; there x's first num_q_heads heads are q, the rest k).
        kv_store (on CUDA only; what AttentionBackend.fused_kv_store gives): the same kernel
        also writes the rotated k and v into the KV pool."""
        if num_q_heads is not None and fused_gpu(like):
            return self._prepare_gpu(positions, like, num_q_heads)
        if fused_cpu(like):
            def rope(x: torch.Tensor, kv_store: None = None) -> torch.Tensor:
                cpu_kernels.rope_(x, positions, self.cos, self.sin)
                return x
            return rope
        cos = self.cos[positions].to(like.dtype).unsqueeze(1)     # [T, 1, D]: broadcast over heads
        sin = self.sin[positions].to(like.dtype).unsqueeze(1)
        return lambda x, kv_store=None: torch.addcmul(x * cos, x.roll(self.half, dims=-1), sin)

    def _prepare_gpu(self, positions: torch.Tensor, like: torch.Tensor, num_q_heads: int
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
        tk = _gpu_ops()
        if self.gpu_cache is None or self.gpu_cache.device != like.device:
            head_dim, max_pos, theta, scaling = self._rope_args
            self.gpu_cache = tk.rope_cos_sin_cache(head_dim, max_pos, theta, scaling, like.device)

        def rope(x: torch.Tensor, kv_store: tuple | None = None) -> torch.Tensor:
            tk.apply_rope_(x[:, :num_q_heads], x[:, num_q_heads:], positions, self.gpu_cache, kv_store)
            return x
        return rope
