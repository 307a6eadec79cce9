#!/usr/bin/env python3
"""benchmarks/results/e2e_cpu.jsonl -> a markdown table, Tandem beside vLLM per workload."""
from __future__ import annotations

import json
import sys
from pathlib import Path

rows = [json.loads(line) for line in Path(sys.argv[1] if len(sys.argv) > 1 else
                                          "benchmarks/results/e2e_cpu.jsonl").read_text().splitlines() if line]
by = {(r["tags"]["system"], r["tags"]["workload"]): r for r in rows}
systems = list(dict.fromkeys(r["tags"]["system"] for r in rows))
print("| workload | system | output tok/s | vs vLLM | TTFT median ms | TPOT median ms | failed |")
print("|---|---|---|---|---|---|---|")
for w in "ABC":
    base = by.get(("vllm", w))
    for s in systems:
        r = by.get((s, w))
        if r is None:
            continue
        ratio = f"{r['output_throughput'] / base['output_throughput']:.2f}x" if base and s != "vllm" else "-"
        print(f"| {w} | {s} | {r['output_throughput']:.1f} | {ratio} | {r['median_ttft_ms']:.0f} | "
              f"{r['median_tpot_ms']:.1f} | {r['failed']} |")
