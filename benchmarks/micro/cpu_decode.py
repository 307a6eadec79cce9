"""End-to-end SmolLM2-135M decode/prefill step timing on CPU, several modes interleaved.

Modes are built in one process and timed round-robin (step i of every mode, then
step i+1 ...), so load from other users of the machine hits all modes alike.
modes:
  eager-flinear      eager, F.linear on fused [out,in] weights
  eager-packed       eager, mkldnn._reorder_linear_weight + _linear_pointwise (oneDNN IP, prepacked)
  compile            torch.compile(inductor) whole forward, no freezing
  compile-freeze     + torch._inductor.config.freezing=True (mkldnn weight prepack)
  compile-freeze-at  + mode=max-autotune (CPP GEMM template vs mkldnn)
  suffix -cppw: torch._inductor.config.cpp_wrapper=True
  suffix -reduce: attention as mul+sum reductions (for compile; fused into C++ by inductor)
usage: python benchmarks/micro/cpu_decode.py --modes eager-flinear eager-packed --dtype bf16 --batch 1
       python benchmarks/micro/cpu_decode.py --modes compile-freeze --prefill 256
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from smollm_cpu_model import SmolLM, fast_random_state_dict, VOCAB  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--modes", nargs="+", default=["eager-flinear", "eager-packed"])
p.add_argument("--dtype", default="bf16")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--ctx", type=int, default=100, help="kv length at the first timed decode step")
p.add_argument("--tmax", type=int, default=256)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--prefill", type=int, default=0, help="time prefill of this many tokens instead of decode")
p.add_argument("--layers", type=int, default=30, help="fewer layers for quick compile experiments")
p.add_argument("--kv-fp32", action="store_true", help="fp32 KV cache (cheaper CPU SDPA in bf16)")
p.add_argument("--check", action="store_true", help="print max |logit diff| vs the first mode")
args = p.parse_args()
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
torch.set_num_threads(args.threads)
torch.manual_seed(0)
B = args.batch
hint = B * max(args.prefill, 1)
sd = fast_random_state_dict()

import torch._inductor.config as ic  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

if args.prefill:
    S = args.prefill
    ids0 = torch.randint(0, VOCAB, (B, S))
    pos0 = torch.arange(S)[None].expand(B, S).contiguous()
    inputs = [(ids0, pos0)] * (args.steps + 1)
else:
    inputs = []
    for i in range(args.steps + 1):
        c = args.ctx + i
        inputs.append((torch.randint(0, VOCAB, (B, 1)), torch.full((B, 1), c - 1, dtype=torch.long)))

runs = {}
for mode in args.modes:
    kind = "packed" if mode.startswith("eager-packed") else "flinear"
    attn = "reduce" if "-reduce" in mode else "sdpa"
    model = SmolLM(sd, dt, kind=kind, batch_hint=hint, nlayers=args.layers, attn=attn,
                   kv_dtype=torch.float32 if args.kv_fp32 else None).eval()
    fwd = model
    if mode.startswith("compile"):
        ic.freezing = "freeze" in mode
        ic.cpp_wrapper = "-cppw" in mode
        # what vLLM's CPU platform sets: no per-call size/nan asserts in the wrapper
        ic.size_asserts = False
        ic.alignment_asserts = False
        ic.nan_asserts = False
        ic.epilogue_fusion = True
        cmode = "max-autotune" if "-at" in mode else None
        torch._dynamo.reset()
        fwd = torch.compile(model, mode=cmode, dynamic=False)
    cache = model.new_cache(B, args.tmax)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fwd(*inputs[0], cache)  # first call = compile for compiled modes
    first = (time.perf_counter() - t0) * 1e3
    g0 = counters["stats"].get("unique_graphs", 0)
    runs[mode] = dict(fwd=fwd, cache=cache, first=first, times=[], g0=g0, out0=out)
    print(f"  built {mode}: first call {first:.0f} ms", flush=True)

for i in range(1, args.steps + 1):
    for mode, r in runs.items():
        ic.freezing = "freeze" in mode
        ic.cpp_wrapper = "-cppw" in mode
        t0 = time.perf_counter()
        with torch.inference_mode():
            r["fwd"](*inputs[i], r["cache"])
        r["times"].append((time.perf_counter() - t0) * 1e3)

ref = next(iter(runs.values()))["out0"]
for mode, r in runs.items():
    t = sorted(r["times"])
    med = statistics.median(t)
    tok = B * max(args.prefill, 1)
    diff = f" maxdiff_vs_{args.modes[0]}={(r['out0'] - ref).abs().max().item():.3g}" if args.check else ""
    print(f"{mode:20s} {args.dtype} thr={args.threads} B={B} "
          f"{'prefill=' + str(args.prefill) if args.prefill else 'ctx=' + str(args.ctx)}: "
          f"first {r['first']:.0f} ms; step median {med:.2f} ms  p10 {t[len(t)//10]:.2f}  min {t[0]:.2f}  "
          f"-> {tok/med*1e3:.0f} tok/s (p10-based {tok/t[len(t)//10]*1e3:.0f}){diff}", flush=True)
print("graphs compiled in total:", counters["stats"].get("unique_graphs", 0))
