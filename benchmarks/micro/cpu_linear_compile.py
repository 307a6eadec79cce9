"""torch.compile (inductor, freezing) of the model's linear stack only (30 x [qkv, o, gate_up, down]
+ lm_head, chained like the model so each input depends on the previous output), to see which GEMM
implementation inductor picks on this CPU (default: mkldnn._linear_pointwise prepack;
max-autotune: also the CPP GEMM template) and what it costs vs eager options.

usage: python benchmarks/micro/cpu_linear_compile.py --dtype bf16 --m 1 --modes eager-flinear eager-packed freeze freeze-at
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import FUSED_LINEARS, NLAYERS, VOCAB, HIDDEN, bench_interleaved  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="bf16")
p.add_argument("--m", type=int, default=1)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--layers", type=int, default=NLAYERS)
p.add_argument("--reps", type=int, default=15)
p.add_argument("--modes", nargs="+", default=["eager-flinear", "eager-packed", "freeze", "freeze-at"])
args = p.parse_args()
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
torch.set_num_threads(args.threads)
torch.manual_seed(0)


class Stack(torch.nn.Module):
    def __init__(self, packed=False):
        super().__init__()
        self.ws = torch.nn.ParameterList()
        for _ in range(args.layers):
            for _, o, i in FUSED_LINEARS:
                self.ws.append(torch.nn.Parameter((torch.randn(o, i) * 0.02).to(dt), requires_grad=False))
        self.lm = torch.nn.Parameter((torch.randn(VOCAB, HIDDEN) * 0.02).to(dt), requires_grad=False)
        self.packed = [torch.ops.mkldnn._reorder_linear_weight(w, args.m) for w in list(self.ws) + [self.lm]] if packed else None

    def lin(self, i, x, w):
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed[i], None, "none", [], "")
        return F.linear(x, w)

    def forward(self, x):
        h = x
        ws = list(self.ws)
        for l in range(args.layers):
            qkv = self.lin(4 * l, h, ws[4 * l])
            a = self.lin(4 * l + 1, qkv[:, :576], ws[4 * l + 1])
            gu = self.lin(4 * l + 2, a, ws[4 * l + 2])
            h = self.lin(4 * l + 3, gu[:, :1536], ws[4 * l + 3])
        return self.lin(len(ws), h, self.lm)


import torch._inductor.config as ic  # noqa: E402

x = torch.randn(args.m, HIDDEN).to(dt)
fns = {}
for mode in args.modes:
    m = Stack(packed=(mode == "eager-packed")).eval()
    f = m
    if mode.startswith("freeze"):
        ic.freezing = True
        torch._dynamo.reset()
        f = torch.compile(m, mode="max-autotune" if mode == "freeze-at" else None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        f(x)
    print(f"  {mode}: first call {time.perf_counter() - t0:.1f} s", flush=True)
    fns[mode] = (lambda f=f: f(x))
with torch.inference_mode():
    res = bench_interleaved(fns, reps=args.reps)
nbytes = sum(o * i for _, o, i in FUSED_LINEARS) * args.layers * dt.itemsize + VOCAB * HIDDEN * dt.itemsize
for k, (med, mn) in res.items():
    print(f"{k:14s} {args.dtype} M={args.m} thr={args.threads}: median {med:.2f} ms (min {mn:.2f})  "
          f"{nbytes/med/1e6:.1f} GB/s")
