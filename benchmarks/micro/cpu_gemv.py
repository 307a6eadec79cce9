"""The CPU skinny bf16 matmul (kernels/cpu gemv_bf16) against oneDNN (torch.mm), SmolLM2-135M shapes.

Each shape is timed cold, as in a decode step: enough copies of the weight to
pass the 32 MB L3 are cycled, so every call streams its weight from memory.
Implementations are timed round-robin (the box is shared: interleaving makes
load noise hit all alike); medians of `--reps` samples are reported.

    python benchmarks/micro/cpu_gemv.py                   # gemv vs onednn
    python benchmarks/micro/cpu_gemv.py --ab OLD_DIR      # + a second build of the kernels in OLD_DIR
    python benchmarks/micro/cpu_gemv.py --model-step      # all 30 layers + lm_head per M (one decode step's matmuls)

GFLOP/s = 2*M*N*K / t; GB/s = weight bytes (2*N*K) / t.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kernels import cpu as K  # noqa: E402

SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]
LAYER = SHAPES[:4]
MS = [1, 2, 4, 8, 16, 32, 64]
COLD_BYTES = 96 << 20


def load_ab(src_dir: str):
    """The kernels built from another copy of kernels/cpu (e.g. `git show HEAD~1:...`)."""
    from torch.utils.cpp_extension import load
    names = ("bindings.cpp", "gemv_bf16.cpp", "decode_attention.cpp", "elementwise.cpp", "decode_layer.cpp")
    build = Path(src_dir) / "build"
    build.mkdir(exist_ok=True)
    return load(name="tandem_cpu_kernels_ab", sources=[str(Path(src_dir) / n) for n in names],
                build_directory=str(build), extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                                          "-mavx512bf16", "-fopenmp"])


def impls(ab_mod):
    out = {"gemv": (K.pack_bf16, K.gemv_bf16), "onednn": (lambda w: w, lambda x, w: torch.mm(x, w.t()))}
    if ab_mod is not None:
        out["gemv_ab"] = (ab_mod.pack_bf16, ab_mod.gemv_bf16)
    return out


def timed_round_robin(calls: dict, reps: int) -> dict[str, float]:
    """calls: name -> fn(); median ms per name, samples interleaved."""
    ts = {k: [] for k in calls}
    for f in calls.values():
        f()
    for _ in range(reps):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}


def per_shape(imp: dict, ms: list[int], reps: int) -> None:
    print(f"{'shape':>8} {'N':>6} {'K':>5} {'M':>3} " + " ".join(f"{n + ' ms/GF/GB':>24}" for n in imp))
    for name, n, k in SHAPES:
        copies = max(1, COLD_BYTES // (2 * n * k))
        ws = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        packed = {key: [pack(w) for w in ws] for key, (pack, _) in imp.items()}
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16)

            def sweep(fn, ps):
                return lambda: [fn(x, p) for p in ps]
            t = timed_round_robin({key: sweep(fn, packed[key]) for key, (_, fn) in imp.items()}, reps)
            row = []
            for key in imp:
                ms_call = t[key] / copies
                row.append(f"{ms_call:8.4f} {2 * m * n * k / ms_call / 1e6:7.1f} {2 * n * k / ms_call / 1e6:6.1f}")
            print(f"{name:>8} {n:6d} {k:5d} {m:3d} " + " ".join(f"{r:>24}" for r in row), flush=True)


def model_step(imp: dict, ms: list[int], reps: int) -> None:
    """Every matmul of one decode step (30 layers of distinct weights + the tied lm_head)."""
    layers = [[torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _, n, k in LAYER] for _ in range(30)]
    head = torch.randn(49152, 576, dtype=torch.bfloat16) * 0.02
    packed = {key: ([[pack(w) for w in ws] for ws in layers], pack(head)) for key, (pack, _) in imp.items()}
    flop_per_tok = 2 * (30 * sum(n * k for _, n, k in LAYER) + 49152 * 576)
    print(f"{'M':>3} " + " ".join(f"{n + ' ms / GFLOP/s':>26}" for n in imp))
    for m in ms:
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in (576, 1536)}

        def step(fn, p):
            def run():
                for ws in p[0]:
                    for w, (_, _, k) in zip(ws, LAYER):
                        fn(xs[k], w)
                fn(xs[576], p[1])
            return run
        t = timed_round_robin({key: step(fn, packed[key]) for key, (_, fn) in imp.items()}, reps)
        print(f"{m:3d} " + " ".join(f"{t[key]:12.2f} {flop_per_tok * m / t[key] / 1e6:13.1f}" for key in imp),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--ab", help="directory holding another copy of kernels/cpu's sources, timed as gemv_ab")
    ap.add_argument("--model-step", action="store_true")
    args = ap.parse_args()
    if not K.available():
        sys.exit("CPU kernels unavailable")
    ms = [int(m) for m in args.ms.split(",")]
    imp = impls(load_ab(args.ab) if args.ab else None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load avg {os.getloadavg()[0]:.1f}, medians of {args.reps}")
    (model_step if args.model_step else per_shape)(imp, ms, args.reps)


if __name__ == "__main__":
    main()
