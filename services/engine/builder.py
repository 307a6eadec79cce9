"""Builds the engine's parts from an EngineConfig: device, dtype, model, KV pool.

Kept apart from engine.py so that the step loop reads on its own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import torch

from kernels import cpu as cpu_kernels

from . import gguf_weights
from .attention.base import default_backend, get_backend
from .config import DTYPES, EngineConfig, ModelConfig
from .cuda_graph import DecodeGraphs, graph_buckets
from .piecewise_graph import PiecewiseGraphs
from .kv_manager import KVManager
from .kv_pool import KVPool
from .loader import ModelSource, iter_weights, resolve_model
from .models.registry import get_model_class
from .request import Request
from .runner import ModelRunner
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Chunk, ScheduledBatch, Scheduler
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
    overlap: bool = False               # host one step ahead of the device (overlap.py)


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
                max_positions: int, seed: int, quant_decode: bool = True) -> torch.nn.Module:
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
    if quant_decode:
        gguf_weights.attach(model, source, dtype, device)
    return model


def kv_pool_pages(config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                  reserve_bytes: int = 0) -> int:
    """Pages of the KV pool (page 0 included). GPU: total * mem_fraction_static, less what
    is in use now (weights, CUDA context) and `reserve_bytes` (activations, graphs)."""
    cc = config.cache
    ps = cc.page_size
    if cc.max_total_tokens:
        return -(-cc.max_total_tokens // ps) + 1          # +1: page 0 is reserved
    per_token = cfg.kv_bytes_per_token(dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cc.mem_fraction_static - (total - free) - reserve_bytes
        what = "mem_fraction_static"
    else:
        budget = min(_mem_available() * cc.mem_fraction, cc.cpu_kv_budget_gb * 2**30)
        what = "mem_fraction"
    if budget <= per_token * ps * 2:
        raise MemoryError(f"no memory left for the KV cache (budget {budget / 2**20:.0f} MiB); "
                          f"lower the model size or raise {what}")
    return KVPool.pages_for_budget(int(budget), ps, per_token)


def activation_reserve(config: EngineConfig, cfg: ModelConfig, model: torch.nn.Module, backend_cls,
                       dtype: torch.dtype, device: torch.device, max_len: int) -> int:
    """GPU bytes to keep free beside the KV pool, measured: the peak of a forward of the
    largest step (max(chunked_prefill_size, max_running_requests) tokens of one sequence)
    over a scratch pool, plus the sampler's fp32 logits copies of the largest batch, plus
    as much again for the CUDA graphs' pool (decode activations, far smaller), plus what
    the backend allocates for its graphs (`graph_bytes`), plus a fixed margin for
    allocator fragmentation and library workspaces."""
    sc, ps = config.scheduler.for_device(device.type), config.cache.page_size
    tokens = min(max(sc.chunked_prefill_size, sc.max_running_requests), max_len - 1)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    pool = KVPool(-(-tokens // ps) + 1, ps, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    runner = ModelRunner(model, backend_cls(pool, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), ps, device)
    req = Request("profile", [0] * tokens, SamplingParams())
    req.pages = list(range(1, pool.num_pages))
    runner.run(ScheduledBatch((Chunk(req, 0, tokens, True),)))
    torch.cuda.synchronize(device)
    pool_bytes = 2 * cfg.num_layers * pool.num_slots * cfg.kv_size * pool.k_cache[0].element_size()
    peak = torch.cuda.max_memory_allocated(device) - base - pool_bytes
    del runner, pool
    torch.cuda.empty_cache()
    sampler = 3 * sc.max_running_requests * cfg.vocab_size * 4
    graphs = 0 if config.disable_cuda_graph else \
        backend_cls.graph_bytes(len(graph_buckets(min(sc.max_running_requests, config.cuda_graph_max_bs))))
    reserve = 2 * peak + sampler + graphs + 512 * 2**20
    log.info("GPU memory: forward of %d tokens peaks at %.0f MiB; %.0f MiB kept beside the KV pool",
             tokens, peak / 2**20, reserve / 2**20)
    return reserve


def capture_graphs(config: EngineConfig, runner: ModelRunner, context_len: int, device: torch.device) -> None:
    """Decode graphs per batch-size bucket, and the piecewise graphs of every other step
    up to the step's token budget (piecewise_cuda_graph_max_tokens caps it; 0: none),
    in one memory pool, the larger (piecewise) first."""
    sc = config.scheduler.for_device(device.type)
    pool = torch.cuda.graph_pool_handle()
    max_tokens = min(max(sc.chunked_prefill_size, sc.max_running_requests), config.piecewise_cuda_graph_max_tokens)
    if max_tokens > 0:
        runner.piecewise = PiecewiseGraphs(runner.model, runner.backend, max_tokens, device)
        runner.piecewise.capture(pool)
    max_bs = min(sc.max_running_requests, config.cuda_graph_max_bs)
    runner.graphs = DecodeGraphs(runner.model, runner.backend, max_bs, -(-context_len // runner.ps), device)
    runner.graphs.capture(pool)


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
    model = build_model(source, cfg, dtype, device, max_len, config.seed, config.gguf_decode)
    ps = config.cache.page_size
    name = default_backend(device) if config.attention_backend == "auto" else config.attention_backend
    backend_cls = get_backend(name)
    reserve = 0
    if device.type == "cuda" and not config.cache.max_total_tokens:
        reserve = activation_reserve(config, cfg, model, backend_cls, dtype, device, max_len)
    num_pages = kv_pool_pages(config, cfg, dtype, device, reserve)
    pool = KVPool(num_pages, ps, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    context_len = min(max_len, (num_pages - 1) * ps)
    log.info("KV pool: %d pages of %d tokens (%d tokens), context %d, dtype %s, device %s, attention %s",
             num_pages - 1, ps, (num_pages - 1) * ps, context_len, dtype, device, name)
    kv = KVManager(pool, ps, config.cache.enable_prefix_cache, config.cache.kv_events)
    backend = backend_cls(pool, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    backend.context_pages = -(-context_len // ps)
    runner = ModelRunner(model, backend, ps, device)
    if device.type == "cuda" and backend.graph_capturable and not config.disable_cuda_graph:
        capture_graphs(config, runner, context_len, device)
    eos = tuple(sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())))
    return EngineParts(
        model_config=cfg, tokenizer=tokenizer, device=device, dtype=dtype, kv=kv,
        scheduler=Scheduler(config.scheduler.for_device(device.type), kv),
        runner=runner,
        sampler=Sampler(seed=config.seed),
        context_len=context_len, eos_token_ids=eos,
        overlap=device.type == "cuda" and not config.disable_overlap,
    )
