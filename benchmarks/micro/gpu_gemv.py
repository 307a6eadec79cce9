"""kernels/triton gemv against cuBLAS at decode batch sizes, on the matmuls of real models,
timed the way a decode step runs them: replayed from a CUDA graph.

Each measurement captures one graph of calls over several copies of the weight
(together > 300 MB, so nothing is served from the 50 MB L2), replays it and divides
by the calls: no launch overhead, which dominates a 20 us kernel timed one call at a
time. For each (model, matmul) and rows M in 1 and 4: cuBLAS (F.linear), the gemv with
its default config, and the best of a sweep of launch configs (BLOCK_N, BLOCK_K, warps,
stages).

usage: python3 benchmarks/micro/gpu_gemv.py [--output results.json] [--models llama-3.1-8b,...]
(default output: $OUT/gpu_gemv.json when $OUT is set)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks.micro.gpu_kernels import hbm_bandwidth  # noqa: E402
from kernels import triton as tk  # noqa: E402
from kernels.triton import reference as ref  # noqa: E402

DEV = torch.device("cuda")
# (hidden, q+2kv, intermediate, vocab) of the three shapes issue 4 measures
MODELS = {"llama-3.1-8b": (4096, 6144, 14336, 128256), "llama-3.2-1b": (2048, 3072, 8192, 128256),
          "qwen2.5-0.5b": (896, 1152, 4864, 151936)}
CONFIGS = [(bn, bk, w, s) for bn in (1, 2, 4, 8) for bk in (512, 1024, 2048) for w in (4, 8) for s in (2, 3)
           if bn * bk // (32 * w) <= 128]


def graph_us(fn, weights) -> float:
    """Microseconds per call of fn(w) for w in weights, replayed from one CUDA graph."""
    for w in weights[:1]:
        fn(w)                                        # compile and warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for w in weights:
                fn(w)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(weights))


def copies(n: int, k: int, total_bytes: float = 3e8) -> list[torch.Tensor]:
    count = max(2, min(32, math.ceil(total_bytes / (n * k * 2))))
    return [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k ** 0.5 for _ in range(count)]


def shapes(hidden, qkv, inter, vocab):
    return {"qkv": (qkv, hidden), "o_proj": (hidden, hidden), "gate_up": (2 * inter, hidden),
            "down": (hidden, inter), "lm_head": (vocab, hidden)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default=os.path.join(os.environ["OUT"], "gpu_gemv.json") if "OUT" in os.environ
                    else None)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rows", default="1,4")
    args = ap.parse_args()
    bw = hbm_bandwidth()["read_GBps"]
    print(f"HBM read {bw:.0f} GB/s", flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "read_GBps": bw, "matmuls": []}
    pct = lambda n, k, us: 100 * n * k * 2 / (us * 1e-6) / (bw * 1e9)   # noqa: E731
    for model in args.models.split(","):
        dims = MODELS[model]
        for name, (n, k) in shapes(*dims).items():
            ws = copies(n, k)
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                torch.testing.assert_close(tk.gemv(x, ws[0]).float(), ref.gemv(x, ws[0]).float(),
                                           atol=2e-2, rtol=2e-2)
                cublas = graph_us(lambda w: F.linear(x, w), ws)
                times = {cfg: graph_us(lambda w, cfg=cfg: tk.gemv(x, w, config=cfg), ws)
                         for cfg in CONFIGS}
                best = min(times, key=times.get)
                default = graph_us(lambda w: tk.gemv(x, w), ws)
                row = {"model": model, "matmul": name, "N": n, "K": k, "M": m, "cublas_us": cublas,
                       "gemv_default_us": default, "gemv_best_us": times[best], "best_config": best,
                       "top5": [(c, times[c]) for c in sorted(times, key=times.get)[:5]],
                       "cublas_pct_bw": pct(n, k, cublas), "gemv_best_pct_bw": pct(n, k, times[best]),
                       "gemv_default_pct_bw": pct(n, k, default)}
                out["matmuls"].append(row)
                print(f"{model:13s} {name:8s} M={m} N={n:6d} K={k:5d}  cuBLAS {cublas:7.1f} us "
                      f"({row['cublas_pct_bw']:4.1f}%)  gemv default {default:7.1f} us "
                      f"({row['gemv_default_pct_bw']:4.1f}%) best {times[best]:7.1f} us "
                      f"({row['gemv_best_pct_bw']:4.1f}%) {best}  next {row['top5'][1:3]}", flush=True)
            del ws
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
