"""Does a compiled SmolLM forward recompile when batch size / kv position change?
Static KV cache + mask => kv length never changes shapes. Batch: dynamic=False (one graph per B)
vs torch._dynamo.mark_dynamic on the batch dim (one symbolic graph).
usage: python benchmarks/micro/cpu_compile_dynamic.py --layers 2 [--autotune]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from smollm_cpu_model import SmolLM, fast_random_state_dict, VOCAB  # noqa: E402
import torch._inductor.config as ic  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=2)
p.add_argument("--autotune", action="store_true")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
ic.freezing = True
ic.size_asserts = False
sd = fast_random_state_dict()
for dyn in (False, True):
    torch._dynamo.reset()
    counters.clear()
    m = SmolLM(sd, torch.bfloat16, nlayers=args.layers, attn="sdpa", kv_dtype=torch.float32).eval()
    f = torch.compile(m, dynamic=False if not dyn else None, mode="max-autotune" if args.autotune else None)
    for B in (1, 3, 8, 16):
        cache = m.new_cache(B, 256)
        for step in range(3):
            ids = torch.randint(0, VOCAB, (B, 1))
            pos = torch.full((B, 1), 50 + step)
            if dyn:
                for t in (ids, pos, *cache[0], *cache[1]):
                    torch._dynamo.mark_dynamic(t, 0)
            t0 = time.perf_counter()
            with torch.inference_mode():
                f(ids, pos, cache)
            dt = time.perf_counter() - t0
            if step == 0:
                print(f"  dynamic={dyn} B={B} first call {dt:.1f} s; graphs so far "
                      f"{counters['stats'].get('unique_graphs', 0)}", flush=True)
