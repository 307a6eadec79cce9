"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, SmolLM2) over a paged KV cache.

Tokens of all sequences in a batch are flattened to [T]; attention goes
through the forward context's backend. Qwen2/Qwen3 reuse this decoder with
QKV bias / q-k norm switched on by ModelConfig (see qwen.py).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..config import ModelConfig
from ..forward_context import current
from kernels.cpu.quant import QuantWeight
from kernels import cpu as cpu_kernels

from ..layers import (GEMV_MAX_TOKENS, GatedMLP, Linear, RMSNorm, RotaryEmbedding, add_rms_norm, linear,
                      pack_for_cpu)
from .registry import register_model


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])], 1)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        ctx = current()
        kv_store = ctx.backend.fused_kv_store(self.layer_id, v, ctx.out_slots)
        qk = rope(qk, kv_store)                           # q and k heads in one go (and the KV store)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        o = ctx.backend.forward(self.layer_id, q, k, v, None if kv_store else ctx.out_slots, ctx.attn_meta)
        return self.o_proj(o)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, residual, rope):
        h, residual = add_rms_norm(x, residual, self.input_layernorm)
        h = self.self_attn(h, rope)
        h, residual = add_rms_norm(h, residual, self.post_attention_layernorm)
        return self.mlp(h), residual

    def fused_weights(self) -> list[torch.Tensor] | None:
        """What cpu_kernels.decode_layer reads, or None if this layer cannot run fused."""
        a, m = self.self_attn, self.mlp
        packed = [a.qkv_proj.packed, a.o_proj.packed, m.gate_up_proj.packed, m.down_proj.packed]
        if a.q_norm is not None or any(p is None for p in packed):
            return None
        return [self.input_layernorm.weight, self.post_attention_layernorm.weight, *packed]


# HF checkpoint names that we store fused: (our param, which slice).
_STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _num_parts(name: str) -> int:
    """How many checkpoint tensors a parameter or module of ours is stacked from."""
    return 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 1


@register_model("llama")
class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        max_pos = min(cfg.max_position_embeddings, max_positions or cfg.max_position_embeddings)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling_dict)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self._packed_embed: torch.Tensor | None = None
        self._quant_embed = None                 # GGUF blocks of a tied lm_head (attach_quant)
        self._fused_weights: list[list[torch.Tensor]] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed_tokens(input_ids)
        fused = self._fused_decode_cache(positions, x)
        residual = None
        if fused is not None:
            return self._forward_fused(x, fused)
        rope = self.rotary.prepare(positions, x, self.cfg.num_heads)
        for layer in self.layers:
            x, residual = layer(x, residual, rope)
        x, _ = add_rms_norm(x, residual, self.norm)
        return x

    # -- CPU bf16 decode: one C++ call per layer -------------------------------------------------
    def _fused_decode_cache(self, positions: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The per-forward tensors of the fused decode path, or None when it does not apply:
        it needs packed bf16 weights and a pure decode batch read in place by the cpu backend."""
        if self._fused_weights is None or x.shape[0] > GEMV_MAX_TOKENS:
            return None
        ctx = current()
        meta = ctx.attn_meta
        if getattr(meta, "decode_lens", None) is None or meta.extends or not meta.decode_contiguous:
            return None
        return [ctx.out_slots, meta.decode_idx, meta.decode_lens, positions, self.rotary.cos, self.rotary.sin]

    def _forward_fused(self, x: torch.Tensor, shared: list[torch.Tensor]) -> torch.Tensor:
        pool, cfg = current().backend.kv_pool, self.cfg
        residual = None
        for i, (layer, w) in enumerate(zip(self.layers, self._fused_weights)):
            x, residual = cpu_kernels.decode_layer(
                x, residual, w, layer.self_attn.qkv_proj.bias, [pool.k_cache[i], pool.v_cache[i], *shared],
                cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, cfg.head_dim ** -0.5)
        x, _ = add_rms_norm(x, residual, self.norm)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return linear(hidden, self.embed_tokens.weight, packed=self._packed_embed, quant=self._quant_embed).float()

    def prepare(self) -> None:
        """After the weights load: derived copies the fast paths read (packed CPU weights)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepare()
        self._packed_embed = pack_for_cpu(self.embed_tokens.weight.data) if self.lm_head is None else None
        fused = [layer.fused_weights() for layer in self.layers]
        self._fused_weights = fused if all(w is not None for w in fused) else None

    def attach_quant(self, weights: Iterable[tuple[str, QuantWeight]]) -> int:
        """GGUF blocks (HF name, QuantWeight) for the matmuls whose fp32 weights they are
        (gguf_weights.py); a fused projection gets them only if all its parts come.
        Returns how many weights were attached."""
        modules = dict(self.named_modules())
        parts: dict[str, dict[int, QuantWeight]] = {}
        for name, qw in weights:
            name = name.removeprefix("model.")
            if name == "embed_tokens.weight" and self.lm_head is None:
                self._quant_embed = qw
                continue
            target, part = self._target(name)
            parts.setdefault(target.removesuffix(".weight"), {})[part or 0] = qw
        n = int(self._quant_embed is not None)
        for mod_name, got in parts.items():
            mod = modules.get(mod_name)
            if not isinstance(mod, Linear):
                continue
            want = _num_parts(mod_name)
            if sorted(got) != list(range(want)):
                continue
            try:
                qw = got[0].cat(*(got[i] for i in range(1, want)))
            except ValueError:                       # parts of different types: keep fp32
                continue
            if (qw.n, qw.k) == tuple(mod.weight.shape):
                mod.quant = qw
                n += want
        return n

    # -- weights ---------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, part = self._target(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            self._copy(params[target], tensor, part)
            loaded.add(target if part is None else f"{target}#{part}")
        self._check_complete(params, loaded)

    def _target(self, name: str) -> tuple[str, int | None]:
        for hf, (ours, part) in _STACKED.items():
            if f".{hf}." in name:
                return name.replace(hf, ours), part
        return name, None

    def _copy(self, param: nn.Parameter, tensor: torch.Tensor, part: int | None) -> None:
        if part is None:
            dst = param.data
        else:
            dst = param.data.narrow(0, self._offset(param, part), tensor.shape[0])
        if dst.shape != tensor.shape:
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)}")
        dst.copy_(tensor)

    def _offset(self, param: nn.Parameter, part: int) -> int:
        cfg = self.cfg
        if param.shape[0] == cfg.q_size + 2 * cfg.kv_size:        # qkv
            return [0, cfg.q_size, cfg.q_size + cfg.kv_size][part]
        return part * cfg.intermediate_size                         # gate_up

    def _check_complete(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = []
        for name, p in params.items():
            parts = _num_parts(name)
            have = [name in loaded] if parts == 1 else [f"{name}#{i}" in loaded for i in range(parts)]
            if not all(have):
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights of a plausible scale (for speed work; `--load-format dummy`)."""
        dev = next(self.parameters()).device
        # CPU: one CPU generator (as always); GPU: a generator there (8B of randn on the host is slow)
        g = torch.Generator(dev if dev.type == "cuda" else "cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif dev.type == "cuda":
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
