"""Builds the engine's parts from an EngineConfig: device, dtype, model, KV pool.

Kept apart from engine.py so that the step loop reads on its own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import torch

from kernels import cpu as cpu_kernels

from .attention.base import default_backend, get_backend
from .config import DTYPES, EngineConfig, ModelConfig
from .kv_manager import KVManager
from .kv_pool import KVPool
from .loader import ModelSource, iter_weights, resolve_model
from .models.registry import get_model_class
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .tokenizer import Tokenizer

log = logging.getLogger("tandem.engine")


@dataclass
class EngineParts:
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    device: torch.device
    dtype: torch.dtype
    kv: KVManager
    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    context_len: int
    eos_token_ids: tuple[int, ...]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPU; on CPU bfloat16 where the CPU has bf16 instructions
    (faster there), else float32 (also the exact reference)."""
    if name == "auto":
        if device.type == "cuda" or {"avx512_bf16", "amx_bf16"} & cpu_kernels.cpu_flags():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is unknown (auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def build_model(source: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, seed: int) -> torch.nn.Module:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = get_model_class(cfg.family)(cfg, max_positions=max_positions)
    finally:
        torch.set_default_dtype(prev)
    if source.load_format == "dummy":
        model.init_dummy_weights(seed)
    else:
        model.load_weights(iter_weights(source))
    model.eval().requires_grad_(False)
    model.prepare()
    return model


def kv_pool_pages(config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    cc = config.cache
    ps = cc.page_size
    if cc.max_total_tokens:
        return -(-cc.max_total_tokens // ps) + 1          # +1: page 0 is reserved
    per_token = cfg.kv_bytes_per_token(dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - total * (1 - cc.mem_fraction)
    else:
        budget = min(_mem_available() * cc.mem_fraction, cc.cpu_kv_budget_gb * 2**30)
    if budget <= per_token * ps * 2:
        raise MemoryError(f"no memory left for the KV cache (budget {budget / 2**20:.0f} MiB); "
                          f"lower the model size or raise mem_fraction")
    return KVPool.pages_for_budget(int(budget), ps, per_token)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def build_engine_parts(config: EngineConfig) -> EngineParts:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_model(config.model, config.load_format)
    cfg = source.model_config
    tokenizer = Tokenizer.from_folder(source.path) if source.has_tokenizer else None
    max_len = min(cfg.max_position_embeddings, config.max_model_len or cfg.max_position_embeddings)
    model = build_model(source, cfg, dtype, device, max_len, config.seed)
    ps = config.cache.page_size
    num_pages = kv_pool_pages(config, cfg, dtype, device)
    pool = KVPool(num_pages, ps, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    context_len = min(max_len, (num_pages - 1) * ps)
    log.info("KV pool: %d pages of %d tokens (%d tokens), context %d, dtype %s, device %s",
             num_pages - 1, ps, (num_pages - 1) * ps, context_len, dtype, device)
    kv = KVManager(pool, ps, config.cache.enable_prefix_cache, config.cache.kv_events)
    backend_name = default_backend(device) if config.attention_backend == "auto" else config.attention_backend
    backend = get_backend(backend_name)(pool, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    eos = tuple(sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())))
    return EngineParts(
        model_config=cfg, tokenizer=tokenizer, device=device, dtype=dtype, kv=kv,
        scheduler=Scheduler(config.scheduler, kv),
        runner=ModelRunner(model, backend, ps, device),
        sampler=Sampler(seed=config.seed),
        context_len=context_len, eos_token_ids=eos,
    )
