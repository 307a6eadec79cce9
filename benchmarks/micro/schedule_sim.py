"""The offline throughput run's schedule on the CPU, priced by a per-step GPU cost model.

The engine's real scheduler, KV manager and radix cache run the workload (N prompts of
IN random ids, OUT tokens each, all at once) with the model taken out (host_step.py's
stub runner). Each scheduled step is priced from measured rates:

    GEMMs       max(weights / HBM, 2 * matmul params * tokens / GEMM FLOP/s)
    decode      the decode rows' KV (context x kv bytes a token) / (HBM x attention efficiency)
    extend      4 * heads * head_dim * new tokens * mean visible keys * layers / extend FLOP/s
    launches    a few microseconds a layer

The defaults are an H200's and the llama-3.1-8b shape; the pool is the run's (its
`kv_pool_tokens`). It prints the steps by kind, the modeled time, retractions, the prompt
tokens computed (more than N x IN when retracted requests recompute), the mean decode batch,
and the run in slices of 100 steps (mean decode batch / modeled seconds / mixed steps), and
the decode steps by the CUDA graph bucket they replay in (cuda_graph.graph_buckets).

On main at e8b56e4 it gave 2,430 steps (643 mixed, 1,786 decode) for the 8B run whose H200
lease had 2,431 (644, 1,787), and a modeled 101.6 s against 104.7 s measured.

    python benchmarks/micro/schedule_sim.py [--pool 919872] [--chunk 2048] [--max-running 512] \
        [--new-token-ratio 0.4]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import host_step  # noqa: E402
from benchmarks.roofline import step_kind  # noqa: E402
from services.engine.cuda_graph import graph_buckets  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Costs:
    weight_bytes: float = 16.06e9        # llama-3.1-8b, bf16
    matmul_params: float = 7.5e9         # per token: 2 FLOPs each (layers + LM head)
    kv_bytes_per_token: int = 131072     # 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
    attn_flops_per_qk: float = 4 * 32 * 128 * 32   # 4 x heads x head_dim x layers
    hbm: float = 4.2e12                  # bytes/s measured on an H200
    attention_efficiency: float = 0.92   # decode attention's share of it (gpu_kernels.py --serving)
    gemm_flops: float = 700e12           # what the run's GEMMs reach
    extend_flops: float = 200e12         # the extend kernel at a mixed step's shape
    launch_s: float = 32 * 3 * 5e-6

    def step(self, batch) -> float:
        tokens = sum(c.n for c in batch.chunks)
        decode_ctx = sum(c.start + 1 for c in batch.chunks if c.n == 1)
        extend = sum(c.n * (c.start + c.n / 2) for c in batch.chunks if c.n > 1)
        gemm = max(self.weight_bytes / self.hbm, 2 * self.matmul_params * tokens / self.gemm_flops)
        return (gemm + decode_ctx * self.kv_bytes_per_token / (self.hbm * self.attention_efficiency)
                + extend * self.attn_flops_per_qk / self.extend_flops + self.launch_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="1000,1024,1024", help="N,IN,OUT")
    ap.add_argument("--pool", type=int, default=919_872, help="KV pool tokens (the run's kv_pool_tokens)")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--max-running", type=int, default=512)
    ap.add_argument("--new-token-ratio", type=float, default=None)
    a = ap.parse_args()
    n, in_len, out_len = (int(x) for x in a.workload.split(","))
    engine = host_step.stub_engine(in_len + out_len + 16, a.pool, a.max_running, a.chunk)
    sched = engine.scheduler
    if a.new_token_ratio is not None:
        sched.cfg = dataclasses.replace(sched.cfg, new_token_ratio=a.new_token_ratio)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_new_tokens=out_len, ignore_eos=True)
    for _ in range(n):
        engine.add_request([rng.randrange(100, 500) for _ in range(in_len)], params)
    costs = Costs()
    kinds, seconds, trace = Counter(), Counter(), []     # trace: (kind, decode rows, seconds)
    prompt_tokens = 0
    while engine.has_unfinished():
        engine.step()
        b = engine.last_batch
        if b is None:
            continue
        kind, t = step_kind(b), costs.step(b)
        kinds[kind] += 1
        seconds[kind] += t
        trace.append((kind, sum(c.n == 1 for c in b.chunks), t))
        prompt_tokens += sum(c.n for c in b.chunks if c.n > 1)
    total = sum(seconds.values())
    decode_rows = [d for _, d, _ in trace]
    print(json.dumps({"pool": a.pool, "chunk": a.chunk, "max_running": a.max_running,
                      "new_token_ratio": sched.cfg.new_token_ratio, "steps": len(trace), "kinds": kinds,
                      "modeled_s": {k: round(v, 1) for k, v in seconds.items()}, "total_s": round(total, 1),
                      "output_tok_s": round(n * out_len / total), "retractions": sched.num_retractions,
                      "prompt_tokens_computed": prompt_tokens,
                      "mean_decode_batch": round(sum(decode_rows) / len(decode_rows), 1)}))
    for i in range(0, len(trace), 100):
        part = trace[i:i + 100]
        print(f"  steps {i:5d}+: decode batch {sum(d for _, d, _ in part) / len(part):5.0f}, "
              f"{sum(t for *_, t in part):5.1f} s, {sum(k == 'mixed' for k, *_ in part):3d} mixed")
    buckets = graph_buckets(min(a.max_running, 512))       # cuda_graph_max_bs 512
    by_bucket = Counter(next((b for b in buckets if b >= d), 0) for k, d, _ in trace if k == "decode")
    print("  decode steps by graph bucket (0: past the biggest, eager): "
          + ", ".join(f"{b}: {c}" for b, c in sorted(by_bucket.items())))


if __name__ == "__main__":
    main()
