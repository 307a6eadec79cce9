"""Offline throughput / latency of the engine, optionally beside transformers.

    python benchmarks/offline.py --model smollm2-135m-instruct --num-prompts 64 \
        --input-len 256 --output-len 128 --baseline transformers

Prompts are random token ids (seeded), generation ignores EOS so every
request yields exactly --output-len tokens. The engine gets every request at
once; the transformers baseline runs `generate` on static batches of
--baseline-batch-size. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from services.engine.engine import Engine  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Keep clear of the special tokens at the bottom of most vocabularies.
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def run_engine(engine: Engine, prompts: list[list[int]], out_len: int, progress: bool) -> dict:
    params = SamplingParams(temperature=0.0, max_new_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    first, last, count = {}, {}, 0
    total = len(prompts) * out_len
    bar = _bar(total, "engine", progress)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.rid, now)
            last[o.rid] = now
        count += len(outs)
        bar.update(len(outs))
    bar.close()
    wall = time.perf_counter() - t0
    ttft = [first[r] - t0 for r in rids]
    tpot = [(last[r] - first[r]) / (out_len - 1) for r in rids] if out_len > 1 else [0.0]
    return {"wall_s": wall, "output_tokens": count, "output_tok_s": count / wall,
            "total_tok_s": (count + sum(map(len, prompts))) / wall,
            "ttft_ms_median": 1e3 * statistics.median(ttft), "tpot_ms_median": 1e3 * statistics.median(tpot)}


def run_transformers(engine: Engine, source_path, hf_config: dict, prompts, out_len: int, batch: int,
                     dtype: torch.dtype, device, progress: bool) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM
    if source_path is not None:
        model = AutoModelForCausalLM.from_pretrained(source_path, dtype=dtype)
    else:
        cfg = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(device).eval()
    bar = _bar(len(prompts) * out_len, "transformers", progress)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=out_len, min_new_tokens=out_len, pad_token_id=0)
            assert out.shape[1] - ids.shape[1] == out_len
            bar.update(ids.shape[0] * out_len)
    bar.close()
    wall = time.perf_counter() - t0
    n = len(prompts) * out_len
    return {"baseline_wall_s": wall, "baseline_output_tok_s": n / wall,
            "baseline_ms_per_step": 1e3 * wall / (out_len * -(-len(prompts) // batch))}


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tok", disable=not enabled, file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--baseline", choices=["transformers"], default=None)
    ap.add_argument("--baseline-batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up requests before timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON result to this file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    progress = not args.no_progress and os.environ.get("TANDEM_NO_PROGRESS") != "1"

    cfg = EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
                       attention_backend=args.attention_backend,
                       cache=CacheConfig(page_size=args.page_size, max_total_tokens=args.max_total_tokens),
                       scheduler=SchedulerConfig(max_running_requests=args.max_running_requests,
                                                 chunked_prefill_size=args.chunked_prefill_size))
    t = time.perf_counter()
    engine = Engine(cfg)
    load_s = time.perf_counter() - t
    vocab = engine.model_config.vocab_size
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    if args.warmup:
        run_engine(engine, make_prompts(args.warmup, args.input_len, vocab, args.seed + 1), 8, False)
        if engine.kv.cache is not None:     # timed prompts must not hit the warm-up's prefix
            engine.kv.cache.reset()
    result = {"bench": "offline", "model": args.model, "load_format": args.load_format,
              "dtype": str(engine.runner.model.embed_tokens.weight.dtype).replace("torch.", ""),
              "device": str(engine.device), "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "load_s": load_s}
    result.update(run_engine(engine, prompts, args.output_len, progress))
    if args.baseline == "transformers":
        from services.engine.loader import resolve_model
        src = resolve_model(args.model, args.load_format)
        path = src.path if src.load_format != "dummy" else None
        result.update(run_transformers(engine, path, src.hf_config, prompts, args.output_len,
                                       args.baseline_batch_size, engine.runner.model.embed_tokens.weight.dtype,
                                       engine.device, progress))
        result["ratio"] = result["output_tok_s"] / result["baseline_output_tok_s"]
    result["machine"] = machine()
    result["command"] = " ".join(["python"] + sys.argv)
    line = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
