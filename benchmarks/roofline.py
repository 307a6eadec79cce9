"""GPU yardsticks for benchmarks/offline.py: measured HBM bandwidth and bf16
matmul FLOP/s, the rooflines built from them, and the GPU's idle share in a
torch profiler trace.

Definitions (printed with the figures):
- read bandwidth: the larger of (a) a copy of a 2 GiB buffer, counting bytes
  read + written, and (b) a sum over a 2 GiB bf16 buffer (bytes read); each
  the best of 20 timed runs after warm-up.
- weight bytes: every parameter of the model (the issue's definition; the
  embedding table is in fact read one row per token, so this overstates
  what an untied model reads by vocab * hidden * 2 bytes).
- prefill FLOPs: 2 * (matmul parameters of the layers) per prompt token, plus
  the LM head once per prompt, plus causal attention 2 * n^2 * heads *
  head_dim per layer for a prompt of n tokens (QK^T and PV, half of each).
- decode time: every step reads the weights once and the KV of each running
  sequence; the batch is what the KV pool holds (and max running requests).
"""
from __future__ import annotations

import math

import torch


def _time_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def measure_hbm(nbytes: int = 2 * 2**30) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src))
    del dst
    x = src.view(torch.bfloat16)
    x.fill_(1.0)
    read_ms = _time_ms(lambda: x.sum(dtype=torch.float32))
    del src, x
    torch.cuda.empty_cache()
    copy_bw, read_bw = 2 * nbytes / copy_ms * 1e3, nbytes / read_ms * 1e3
    return {"copy_bw_GBs": copy_bw / 1e9, "read_sum_bw_GBs": read_bw / 1e9,
            "bandwidth_GBs": max(copy_bw, read_bw) / 1e9,
            "bandwidth_from": "copy (read+write)" if copy_bw >= read_bw else "sum (read)"}


def measure_matmul(n: int = 8192) -> dict:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = _time_ms(lambda: a @ b)
    return {"matmul_shape": n, "bf16_TFLOPs": 2 * n**3 / ms / 1e9}


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def layer_matmul_params(cfg) -> int:
    per_layer = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer


def prefill_flops(cfg, num_prompts: int, input_len: int) -> float:
    linear = 2 * layer_matmul_params(cfg) * input_len + 2 * cfg.hidden_size * cfg.vocab_size
    attention = 2 * input_len**2 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return num_prompts * (linear + attention)


def decode_seconds(cfg, wbytes: int, kv_per_token: int, num_prompts: int, input_len: int, output_len: int,
                   batch: int, bandwidth: float) -> float:
    """Waves of `batch` sequences decoding output_len steps; each step reads the weights and
    the KV of the batch at its mean context."""
    batch = max(1, min(batch, num_prompts))
    steps = output_len * math.ceil(num_prompts / batch)
    per_step = wbytes + batch * kv_per_token * (input_len + output_len / 2)
    return steps * per_step / bandwidth


def throughput_roofline(cfg, wbytes: int, kv_per_token: int, num_prompts: int, input_len: int,
                        output_len: int, batch: int, hw: dict) -> dict:
    t_pre = prefill_flops(cfg, num_prompts, input_len) / (hw["bf16_TFLOPs"] * 1e12)
    t_dec = decode_seconds(cfg, wbytes, kv_per_token, num_prompts, input_len, output_len, batch,
                           hw["bandwidth_GBs"] * 1e9)
    out = num_prompts * output_len
    return {"roofline_batch": batch, "roofline_prefill_s": t_pre, "roofline_decode_s": t_dec,
            "roofline_tok_s_serial": out / (t_pre + t_dec),           # prefill never overlaps decode
            "roofline_tok_s_overlapped": out / max(t_pre, t_dec)}     # prefill hidden entirely


def decode_roofline_tok_s(wbytes: int, kv_per_token: int, batch: float, context: float, bandwidth: float) -> float:
    """Output tok/s of decode steps of `batch` sequences at mean `context`, bound by HBM."""
    return batch * bandwidth / (wbytes + batch * kv_per_token * context)


def step_kind(batch) -> str:
    """decode (one new token per sequence), prefill (none decoding), mixed, or none."""
    if batch is None:
        return "none"
    ones = sum(c.n == 1 for c in batch.chunks)
    return "decode" if ones == len(batch.chunks) else "prefill" if ones == 0 else "mixed"


def gpu_idle_share(prof, window_name: str = "engine_step", kinds: list[str] | None = None) -> dict:
    """Share of the profiled steps' wall time (from the first step's start to the last one's
    end, CPU clock) in which no GPU kernel or copy runs. With kinds (each profiled step's
    step_kind, in order), also the wall and idle time of the steps of each kind, each step
    being its host range (with overlap, the device runs the step before meanwhile)."""
    steps, host_steps, busy, by_name = [], [], [], {}
    for e in prof.events():
        tr = e.time_range
        if e.name == window_name:
            steps.append((tr.start, tr.end))
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                host_steps.append((tr.start, tr.end))
        elif getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            busy.append((tr.start, tr.end))
            t = by_name.setdefault(e.name[:120], [0.0, 0])
            t[0] += tr.end - tr.start
            t[1] += 1
    if not steps:
        return {}
    lo, hi = min(s for s, _ in steps), max(e for _, e in steps)
    merged: list[list[float]] = []
    for s, e in sorted((max(s, lo), min(e, hi)) for s, e in busy if e > lo and s < hi):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    covered = sum(e - s for s, e in merged)
    wall = hi - lo
    per_kind = {}
    if kinds and len(kinds) == len(host_steps):
        per_kind = {"step_kinds": _idle_by_kind(sorted(host_steps), kinds, merged)}
    kernel_ms = sum(t for t, _ in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return {"profiled_steps": len(steps), "profiled_wall_ms": wall / 1e3,
            "gpu_busy_ms": covered / 1e3, "gpu_idle_share": 1 - covered / wall if wall else 0.0,
            "kernel_ms": kernel_ms / 1e3,
            "top_kernels": [{"name": n, "ms": round(t / 1e3, 3), "calls": c,
                             "share": round(t / kernel_ms, 4) if kernel_ms else 0.0} for n, (t, c) in top],
            **per_kind}


def _idle_by_kind(steps: list[tuple[float, float]], kinds: list[str], merged: list[list[float]]) -> dict:
    """{kind: {steps, wall_ms, idle_ms}} of host step ranges against merged busy intervals."""
    out: dict[str, dict] = {}
    j = 0
    for (s, e), kind in zip(steps, kinds):
        while j < len(merged) and merged[j][1] <= s:
            j += 1
        busy, k = 0.0, j
        while k < len(merged) and merged[k][0] < e:
            busy += min(e, merged[k][1]) - max(s, merged[k][0])
            k += 1
        d = out.setdefault(kind, {"steps": 0, "wall_ms": 0.0, "idle_ms": 0.0})
        d["steps"] += 1
        d["wall_ms"] += (e - s) / 1e3
        d["idle_ms"] += (e - s - busy) / 1e3
    return out


def merge_kinds(parts: list[dict]) -> dict:
    """Per-kind step figures of several windows (or runs), summed."""
    out: dict[str, dict] = {}
    for part in parts:
        for kind, d in part.items():
            t = out.setdefault(kind, {k: 0 for k in d})
            for k, v in d.items():
                t[k] = round(t.get(k, 0) + v, 3)
    return out


def merge_idle(windows: list[dict]) -> dict:
    """gpu_idle_share of several profiler windows as one: steps, wall and busy time summed,
    kernels merged by name; each window's own idle share under "window_idle_shares"."""
    if not windows:
        return {}
    wall = sum(w["profiled_wall_ms"] for w in windows)
    busy = sum(w["gpu_busy_ms"] for w in windows)
    by_name: dict[str, list] = {}
    for w in windows:
        for k in w.get("top_kernels", []):
            t = by_name.setdefault(k["name"], [0.0, 0])
            t[0] += k["ms"]
            t[1] += k["calls"]
    # every kernel's time (the windows' lists are cut to their top ones), for the shares
    kernel_ms = sum(w.get("kernel_ms", sum(k["ms"] for k in w.get("top_kernels", []))) for w in windows)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return {"profiled_steps": sum(w["profiled_steps"] for w in windows), "profiled_wall_ms": wall,
            "kernel_ms": kernel_ms,
            "gpu_busy_ms": busy, "gpu_idle_share": 1 - busy / wall if wall else 0.0,
            "window_idle_shares": [round(w["gpu_idle_share"], 4) for w in windows],
            **({"step_kinds": merge_kinds([w["step_kinds"] for w in windows if "step_kinds" in w])}
               if any("step_kinds" in w for w in windows) else {}),
            "top_kernels": [{"name": n, "ms": round(t, 3), "calls": c,
                             "share": round(t / kernel_ms, 4) if kernel_ms else 0.0} for n, (t, c) in top]}


TOP_KERNELS = 15     # kernels (and copies) by GPU time over the profiled steps, in the JSON
