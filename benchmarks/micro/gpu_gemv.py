"""kernels/triton gemv against cuBLAS at decode batch sizes, on the matmuls of real models.

For each (model, matmul) shape and rows M in 1, 2, 4, 8: cuBLAS (F.linear) and the
gemv over a sweep of launch configs (BLOCK_N, BLOCK_K, warps); the best config's time,
GB/s of weight read, % of the measured HBM read bandwidth. Then the fused forms against
what they replace: add_rmsnorm + qkv (fused_add_rmsnorm then cuBLAS) and silu_mul + down.
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs).

usage: python3 benchmarks/micro/gpu_gemv.py [--output results.json] [--quick]
(default output: $OUT/gpu_gemv.json when $OUT is set)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks.micro.gpu_kernels import hbm_bandwidth  # noqa: E402
from kernels import triton as tk  # noqa: E402
from kernels.triton import reference as ref  # noqa: E402

DEV = torch.device("cuda")
# (hidden, q+2kv, intermediate, vocab) of the three shapes issue 4 measures
MODELS = {"llama-3.1-8b": (4096, 6144, 14336, 128256), "llama-3.2-1b": (2048, 3072, 8192, 128256),
          "qwen2.5-0.5b": (896, 1152, 4864, 151936)}
CONFIGS = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (128, 256, 512) for w in (4, 8)]


def bench_ms(fn, rep=40) -> float:
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def shapes(hidden, qkv, inter, vocab):
    return {"qkv": (qkv, hidden), "o_proj": (hidden, hidden), "gate_up": (2 * inter, hidden),
            "down": (hidden, inter), "lm_head": (vocab, hidden)}


def fits(m: int, cfg) -> bool:
    bn, bk, w = cfg
    return triton_pow2(m) * bn * bk // (32 * w) <= 128          # fp32 accumulators per thread


def triton_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default=os.path.join(os.environ["OUT"], "gpu_gemv.json") if "OUT" in os.environ
                    else None)
    ap.add_argument("--quick", action="store_true", help="8B shapes at M 1 and 4 only")
    args = ap.parse_args()
    bw = hbm_bandwidth()["read_GBps"]
    print(f"HBM read {bw:.0f} GB/s", flush=True)
    rows_of = [1, 4] if args.quick else [1, 2, 4, 8]
    models = {"llama-3.1-8b": MODELS["llama-3.1-8b"]} if args.quick else MODELS
    out = {"gpu": torch.cuda.get_device_name(), "read_GBps": bw, "matmuls": [], "fused": []}
    for model, dims in models.items():
        for name, (n, k) in shapes(*dims).items():
            w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k ** 0.5
            gb = n * k * 2 / 1e9
            for m in rows_of:
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                torch.testing.assert_close(tk.gemv(x, w).float(), ref.gemv(x, w).float(), atol=2e-2, rtol=2e-2)
                cublas = bench_ms(lambda: F.linear(x, w))
                times = {cfg: bench_ms(lambda cfg=cfg: tk.gemv(x, w, config=cfg), rep=20)
                         for cfg in CONFIGS if fits(m, cfg)}
                best = min(times, key=times.get)
                tdef = bench_ms(lambda: tk.gemv(x, w))
                row = {"model": model, "matmul": name, "N": n, "K": k, "M": m, "cublas_ms": cublas,
                       "gemv_default_ms": tdef, "gemv_best_ms": times[best], "best_config": best,
                       "top5": sorted(times, key=times.get)[:5],
                       "cublas_pct_bw": 100 * gb / cublas / bw * 1e3, "gemv_pct_bw": 100 * gb / times[best] / bw * 1e3,
                       "gemv_default_pct_bw": 100 * gb / tdef / bw * 1e3}
                out["matmuls"].append(row)
                print(f"{model:13s} {name:8s} M={m} N={n:6d} K={k:5d}  cuBLAS {cublas * 1e3:7.1f} us "
                      f"({row['cublas_pct_bw']:4.1f}%)  gemv default {tdef * 1e3:7.1f} us "
                      f"({row['gemv_default_pct_bw']:4.1f}%) best {times[best] * 1e3:7.1f} us "
                      f"({row['gemv_pct_bw']:4.1f}%) {best}", flush=True)
        hidden, qkv, inter, _ = dims
        for m in rows_of:
            x, r = (torch.randn(m, hidden, device=DEV, dtype=torch.bfloat16) for _ in range(2))
            nw = torch.randn(hidden, device=DEV, dtype=torch.bfloat16)
            wq = torch.randn(qkv, hidden, device=DEV, dtype=torch.bfloat16) / hidden ** 0.5
            sep = bench_ms(lambda: F.linear(tk.fused_add_rmsnorm(x, r, nw, 1e-5)[0], wq))
            fused = bench_ms(lambda: tk.add_rmsnorm_gemv(x, r, nw, 1e-5, wq))
            gu = torch.randn(m, 2 * inter, device=DEV, dtype=torch.bfloat16)
            wd = torch.randn(hidden, inter, device=DEV, dtype=torch.bfloat16) / inter ** 0.5
            sep2 = bench_ms(lambda: F.linear(tk.silu_mul(gu), wd))
            fused2 = bench_ms(lambda: tk.silu_mul_gemv(gu, wd))
            out["fused"].append({"model": model, "M": m, "norm_qkv_separate_ms": sep, "norm_qkv_fused_ms": fused,
                                 "silu_down_separate_ms": sep2, "silu_down_fused_ms": fused2})
            print(f"{model:13s} M={m}  add_rmsnorm+qkv {sep * 1e3:6.1f} -> {fused * 1e3:6.1f} us   "
                  f"silu_mul+down {sep2 * 1e3:6.1f} -> {fused2 * 1e3:6.1f} us", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
