"""vLLM's CPU build, batch-1 decode, the same workload as offline.py's
`--num-prompts 1 --input-len 32 --output-len 128` (run it in vLLM's own venv,
see ../shared/peers/vllm-cpu/README.md; not a Tandem dependency).

    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 \
    LD_PRELOAD=<libtcmalloc_minimal.so.4>:$VENV/lib/libiomp5.so \
    $VENV/bin/python benchmarks/peers/vllm_cpu_batch1.py MODEL_DIR [REPS]

TPOT = (time of 128 tokens - time of 1 token) / 127, per repetition, with a
fresh random prompt each time (no prefix-cache hits). Prints one JSON line.
"""
import importlib.metadata as md
import json
import random
import statistics
import sys
import time

_orig_version = md.version


def _version(name):   # vllm-cpu registers as "vllm-cpu"; vLLM asks for "vllm" (see the peers' shim)
    if name == "vllm":
        try:
            return _orig_version("vllm")
        except md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


md.version = _version

from vllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    folder, reps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    llm = LLM(model=folder, dtype="bfloat16", max_model_len=2048)
    rng = random.Random(1)
    prompt = lambda: {"prompt_token_ids": [rng.randrange(100, 49152) for _ in range(32)]}  # noqa: E731
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
    full = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0)
    llm.generate([prompt()], full, use_tqdm=False)
    ttft, tpot = [], []
    for _ in range(reps):
        t = time.perf_counter()
        llm.generate([prompt()], one, use_tqdm=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate([prompt()], full, use_tqdm=False)
        t128 = time.perf_counter() - t
        ttft.append(t1 * 1e3)
        tpot.append((t128 - t1) / 127 * 1e3)
    print(json.dumps({"peer": "vllm-cpu 0.32.0", "dtype": "bfloat16", "ttft_ms": ttft, "tpot_ms": tpot,
                      "tpot_ms_median": statistics.median(tpot)}))


if __name__ == "__main__":
    main()
