"""Reference: transformers AutoModelForCausalLM (SmolLM2-135M shape, random weights) generate()
throughput on CPU: static batch of B prompts of P tokens, N new tokens (greedy, no EOS stop).

usage: python benchmarks/micro/hf_generate_ref.py --dtype bf16 --batch 16 --prompt 256 --new 128
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from smollm_cpu_model import smollm_config, VOCAB  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="bf16")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--prompt", type=int, default=256)
p.add_argument("--new", type=int, default=128)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
torch.set_num_threads(args.threads)
torch.manual_seed(0)
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_config(smollm_config(), torch_dtype=dt).eval()
ids = torch.randint(0, VOCAB, (args.batch, args.prompt))
att = torch.ones_like(ids)
kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
with torch.inference_mode():
    model.generate(ids[:, :16], attention_mask=att[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
    # prefill alone (1 new token) to split prefill vs decode time
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=att, max_new_tokens=1, do_sample=False, pad_token_id=0)
    t_pre = time.perf_counter() - t0
    for r in range(args.repeats):
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=att, **kw)
        dt_s = time.perf_counter() - t0
        n_new = (out.shape[1] - args.prompt) * args.batch
        print(f"HF generate {args.dtype} thr={args.threads} B={args.batch} prompt={args.prompt} new={args.new}: "
              f"{dt_s:.1f} s total, {n_new/dt_s:.1f} output tok/s; prefill-only {t_pre:.2f} s; "
              f"decode ~{(dt_s - t_pre)/(args.new-1)*1e3:.0f} ms/step ({n_new/(dt_s - t_pre):.1f} tok/s decode-only)",
              flush=True)
