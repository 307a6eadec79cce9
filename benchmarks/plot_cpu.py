"""Plot the CPU engine results in benchmarks/results/ (a PNG beside them).

    python benchmarks/plot_cpu.py
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    a = json.loads((RESULTS / "cpu_offline_smollm2_64x256x128.json").read_text())
    c = json.loads((RESULTS / "cpu_batch1_vs_vllm.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["Tandem", "transformers\n(static batch 16)"], [a["output_tok_s"], a["baseline_output_tok_s"]],
             color=["#2b7bba", "#999999"])
    left.set_ylabel("output tokens / s (higher is better)")
    left.set_title(f"64 x 256 -> 128 tokens: {a['ratio']:.2f}x")
    t, v = c["tandem"]["tpot_ms"], c["vllm_cpu_server"]["tpot_ms"]
    right.bar(["Tandem", "vLLM CPU 0.32\n(server, streaming)"], [statistics.median(t), statistics.median(v)],
              color=["#2b7bba", "#999999"])
    right.scatter([0] * len(t) + [1] * len(v), t + v, color="black", s=12, zorder=3, label="runs")
    right.axhline(11.9, color="#d62728", ls="--", lw=1, label="11.9 ms (vLLM, another day)")
    right.set_ylabel("ms per output token (lower is better)")
    right.set_title("batch-1 decode, 32 -> 128 tokens")
    right.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, bf16, 2-core AMD EPYC (AVX-512 BF16), 2026-11-22", fontsize=10)
    fig.tight_layout()
    out = RESULTS / "cpu_engine.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
