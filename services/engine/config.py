"""Frozen configs of the engine's parts.

ModelConfig describes an architecture (read from a Hugging Face config.json);
EngineConfig the engine around it. Derived values are properties.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

# HF `architectures` / `model_type` -> our model family.
ARCH_FAMILIES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
}


@dataclass(frozen=True)
class ModelConfig:
    family: str                       # llama | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None   # frozen dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False             # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.kv_size * torch.finfo(dtype).bits // 8

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = (cfg.get("architectures") or [None])[0]
        family = ARCH_FAMILIES.get(arch) or ARCH_FAMILIES.get(cfg.get("model_type", ""))
        if family is None:
            raise ValueError(f"unsupported architecture {arch or cfg.get('model_type')!r} "
                             f"(supported: {sorted(set(ARCH_FAMILIES))})")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        scaling = cfg.get("rope_scaling") or None
        if scaling is None and isinstance(cfg.get("rope_parameters"), dict):
            rp = cfg["rope_parameters"]   # transformers >= 5 keeps theta and scaling here
            if rp.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted((k, _freeze(v)) for k, v in scaling.items())) if scaling else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    mem_fraction: float = 0.85        # CPU: share of MemAvailable (capped by cpu_kv_budget_gb)
    # GPU: share of the device's total memory the engine may hold: weights, activations,
    # CUDA graphs and the KV pool, which gets what the others leave.
    # The activations and graphs are measured (builder.activation_reserve); the rest (7%)
    # is for what is not: cuBLAS workspaces, transfer buffers, fragmentation.
    mem_fraction_static: float = 0.93
    max_total_tokens: int | None = None   # explicit pool size in tokens; wins over the fractions
    cpu_kv_budget_gb: float = 4.0     # what mem_fraction applies to on CPU
    enable_prefix_cache: bool = True
    kv_events: bool = False           # record KV events (workers stream them to gateways)


@dataclass(frozen=True)
class SchedulerConfig:
    schedule_policy: str = "lpm"      # fcfs | lpm
    max_running_requests: int = 256
    chunked_prefill_size: int = 0     # per-step token budget for new (prefill) tokens; 0: by device
    new_token_ratio: float = 0.4      # share of max_new_tokens reserved at admission

    def for_device(self, device_type: str) -> "SchedulerConfig":
        """0 budget -> 2048 tokens on GPU, 512 on CPU: a CPU computes ~300 prompt tokens a
        second per 100M parameters, so a 2048-token step would stall every decode for
        seconds, and a burst of prompts gets its first tokens in larger waves."""
        if self.chunked_prefill_size > 0:
            return self
        return dataclasses.replace(self, chunked_prefill_size=512 if device_type == "cpu" else 2048)


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    load_format: str = "auto"         # auto | hf | gguf | dummy
    dtype: str = "auto"               # auto | float32 | bfloat16 | float16
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    attention_backend: str = "auto"   # auto | torch | cpu (C++ kernels) | triton | flashinfer
    disable_cuda_graph: bool = False  # decode batches run eagerly
    cuda_graph_max_bs: int = 512      # largest decode batch captured (capped by max_running_requests)
    # other steps (prefill, mixed): their token-wise layers replay from graphs up to this many
    # tokens (capped by the step's token budget; 0: eager), attention runs between them
    piecewise_cuda_graph_max_tokens: int = 4096
    disable_overlap: bool = False     # CUDA: schedule step N+1 only after step N's ids are read back
    max_model_len: int | None = None  # context cap; default: the model's, bounded by the pool
    gguf_decode: bool = True          # CPU fp32 from a GGUF: decode matmuls read its quantized blocks
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def replace(self, **kw: Any) -> "EngineConfig":
        return dataclasses.replace(self, **kw)
