"""Shared helpers for CPU micro-benchmarks (SmolLM2-135M shapes)."""
import statistics
import time

import torch

HIDDEN, INTER, NH, NKV, HD, NLAYERS, VOCAB = 576, 1536, 9, 3, 64, 30, 49152
# (name, out, in) per layer
LAYER_LINEARS = [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
                 ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536)]
FUSED_LINEARS = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]


def model_weight_numel(with_lm_head=True):
    n = NLAYERS * sum(o * i for _, o, i in LAYER_LINEARS)
    return n + (VOCAB * HIDDEN if with_lm_head else 0)


def bench(fn, reps=15, warmup=3, inner=1):
    """Median wall time in ms of fn() (fn run `inner` times per sample)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) * 1e3 / inner)
    ts.sort()
    return statistics.median(ts), ts[0]


def bench_interleaved(fns, reps=11, warmup=2):
    """Round-robin timing of several callables so load noise hits all alike.

    Returns {name: (median_ms, min_ms)}.
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in ts.items()}
