"""Batch-1 TTFT / TPOT of an OpenAI-compatible server (e.g. vLLM's CPU build,
started with ../shared/peers/vllm-cpu/serve.sh), streaming /v1/completions with
a prompt of 32 random token ids and 128 output tokens, ignore_eos, greedy.

    python benchmarks/peers/stream_tpot.py http://127.0.0.1:8100 MODEL_NAME [REPS]

Standard library only. TPOT = (last chunk - first chunk) / (tokens - 1).
"""
import http.client
import json
import random
import statistics
import sys
import time
from urllib.parse import urlparse


def one(url, model: str, prompt: list[int]) -> tuple[float, float, int]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 128, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    n = 0
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    conn.close()
    return (first - t0) * 1e3, (last - first) / max(n - 1, 1) * 1e3, n


def main() -> None:
    url, model = sys.argv[1], sys.argv[2]
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    rng = random.Random(2)
    prompt = lambda: [rng.randrange(100, 49152) for _ in range(32)]  # noqa: E731
    one(url, model, prompt())                      # warm-up
    res = [one(url, model, prompt()) for _ in range(reps)]
    print(json.dumps({"url": url, "ttft_ms": [r[0] for r in res], "tpot_ms": [r[1] for r in res],
                      "chunks": [r[2] for r in res], "tpot_ms_median": statistics.median(r[1] for r in res),
                      "ttft_ms_median": statistics.median(r[0] for r in res)}))


if __name__ == "__main__":
    main()
