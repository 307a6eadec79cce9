#!/usr/bin/env python3
"""benchmarks/results/e2e_cpu.jsonl -> a markdown table, Tandem beside vLLM per workload.

The baseline of each workload is vLLM's best run there (highest output tok/s over
its dtypes: systems named vllm or vllm-DTYPE)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

rows = [json.loads(line) for line in Path(sys.argv[1] if len(sys.argv) > 1 else
                                          "benchmarks/results/e2e_cpu.jsonl").read_text().splitlines() if line]
by = {(r["tags"]["system"], r["tags"]["workload"]): r for r in rows}
systems = list(dict.fromkeys(r["tags"]["system"] for r in rows))
print("| workload | system | output tok/s | vs best vLLM | TTFT median ms | TPOT median ms | failed |")
print("|---|---|---|---|---|---|---|")
for w in "ABC":
    peers = [by[(s, w)] for s in systems if s.startswith("vllm") and (s, w) in by]
    base = max(peers, key=lambda r: r["output_throughput"], default=None)
    for s in systems:
        r = by.get((s, w))
        if r is None:
            continue
        ratio = "-" if base is None or s.startswith("vllm") else f"{r['output_throughput'] / base['output_throughput']:.2f}x"
        print(f"| {w} | {s} | {r['output_throughput']:.1f} | {ratio} | {r['median_ttft_ms']:.0f} | "
              f"{r['median_tpot_ms']:.1f} | {r['failed']} |")
