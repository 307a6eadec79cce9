"""Per-call overhead and per-shape streaming efficiency of linear options (batch 1).

- overhead: tiny hot weight (64x64) called in a loop -> us/call (dispatch + oneDNN setup)
- streaming: each shape with NLAYERS distinct weights (cold, > L3) -> GB/s per shape
usage: python benchmarks/micro/cpu_linear_breakdown.py --dtype bf16 --threads 1
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import NLAYERS, VOCAB, HIDDEN, bench_interleaved  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="bf16")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--m", type=int, default=1)
p.add_argument("--reps", type=int, default=15)
args = p.parse_args()
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
torch.set_num_threads(args.threads)
M = args.m


def lin_packed(w):
    pw = torch.ops.mkldnn._reorder_linear_weight(w, M)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")


def opts_for(w):
    o = {"F.linear": (lambda x, w=w: F.linear(x, w)),
         "mkldnn packed IP": lin_packed(w)}
    if dt == torch.float32:
        mw = torch.ops.mkl._mkl_reorder_linear_weight(w, M)
        o["mkl packed"] = lambda x, mw=mw, w=w: torch.ops.mkl._mkl_linear(x, mw, w, None, M)
    return o


# 1) per-call overhead on a tiny, cache-hot weight
w = torch.randn(64, 64).to(dt)
x = torch.randn(M, 64).to(dt)
fns = {k: (lambda f=f: [f(x) for _ in range(200)]) for k, f in opts_for(w).items()}
fns["torch.add (reference)"] = lambda: [torch.add(x, x) for _ in range(200)]
res = bench_interleaved(fns, reps=args.reps)
print(f"dtype={args.dtype} threads={args.threads} M={M}")
print("per-call overhead, 64x64 hot weight:")
for k, (med, mn) in res.items():
    print(f"  {k:22s} {med*1e3/200:7.1f} us/call (min {mn*1e3/200:6.1f})")

# 2) cold streaming per shape
shapes = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", VOCAB, HIDDEN)]
print("cold streaming per shape (NLAYERS distinct weights, lm_head x1):")
for name, o, i in shapes:
    n = 1 if name == "lm_head" else NLAYERS
    ws = [(torch.randn(o, i) * 0.02).to(dt) for _ in range(n)]
    x = torch.randn(M, i).to(dt)
    per = [opts_for(w_) for w_ in ws]
    fns = {k: (lambda k=k: [pp[k](x) for pp in per]) for k in per[0]}
    # evictor: touch 64MB between samples so that lm_head is cold too
    ev = torch.empty(16 * 2**20)
    fns2 = {k: (lambda f=f: (ev.fill_(1.0), f())) for k, f in fns.items()}
    t_ev = bench_interleaved({"ev": lambda: ev.fill_(1.0)}, reps=args.reps)["ev"][0]
    res = bench_interleaved(fns2, reps=args.reps)
    nbytes = n * o * i * ws[0].element_size()
    for k, (med, mn) in res.items():
        med -= t_ev
        mn -= t_ev
        print(f"  {name:8s} {o:5d}x{i:<5d} x{n:<3d} {k:18s} {med*1e3/n:8.1f} us/call  "
              f"{nbytes/med/1e6:5.1f} GB/s (best {nbytes/mn/1e6:5.1f})")
