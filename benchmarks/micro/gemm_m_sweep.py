"""cuBLAS time of a decoder layer's four GEMMs against the row count M (the batch).

A decode step's GEMMs should take time that grows with M, flat while they are memory-bound
and then about linear. cuBLAS's heuristics pick a kernel per shape, and some M get a slow one:
on an H100 (torch 2.11, cu130) the llama-3.1-8b gate_up projection takes 287 us at M = 448
against 136-148 us at 432-512. Such an M is worth padding past, which is what the decode
graphs' measured routing does (services/engine/cuda_graph.py: DecodeGraphs.route).

    python3 benchmarks/micro/gemm_m_sweep.py [--hidden 4096 --inter 14336 --heads 32 --kv-heads 8]
        [--m 8:256:8,272:512:16,2048] [--out FILE]

(--m: values and inclusive start:stop:step ranges; e.g. 2048:2560:16 for the mixed steps'
2,048 prompt tokens plus a decode batch.)

Prints, per M, the four GEMMs' times (us: qkv, o, gate_up, down) and their sum.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

M_DEFAULT = "8:256:8,272:512:16,1024,2048,2096,2304,2496"


def parse_m(spec: str) -> list[int]:
    """'8:256:8,1024' -> [8, 16, ..., 256, 1024] (ranges include their stop)."""
    out = []
    for part in spec.split(","):
        if ":" in part:
            lo, hi, step = (int(x) for x in part.split(":"))
            out += list(range(lo, hi + 1, step))
        else:
            out.append(int(part))
    return out


def time_us(fn, iters: int = 10) -> float:
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--m", default=M_DEFAULT, help="row counts: values and start:stop:step ranges")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    h, d = args.hidden, args.head_dim
    shapes = {"qkv": ((args.heads + 2 * args.kv_heads) * d, h), "o": (h, args.heads * d),
              "gate_up": (2 * args.inter, h), "down": (h, args.inter)}
    dev = "cuda"
    weights = {k: torch.randn(s, device=dev, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
    rows = []
    for m in parse_m(args.m):
        us = {k: time_us(lambda: F.linear(torch.empty(m, kk, device=dev, dtype=torch.bfloat16), weights[k]))
              for k, (_, kk) in shapes.items()}
        rows.append({"m": m, **{k: round(v, 1) for k, v in us.items()}, "sum": round(sum(us.values()), 1)})
        print(f"M {m:5d}: " + " ".join(f"{k} {v:6.0f}" for k, v in us.items()) + f"  sum {sum(us.values()):6.0f} us")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": shapes, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
