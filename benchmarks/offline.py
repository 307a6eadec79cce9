"""Offline throughput / latency of the engine, optionally beside transformers.

    python benchmarks/offline.py --model smollm2-135m-instruct --num-prompts 64 \
        --input-len 256 --output-len 128 --baseline transformers

    # GPU: HBM bandwidth and bf16 FLOP/s, batch-1 decode against its roofline and
    # transformers, 1000 x 1024 -> 1024 throughput against its roofline, GPU idle share,
    # and a batch sweep (JSON + plot in benchmarks/results/)
    python benchmarks/offline.py --device cuda --load-format dummy --model llama-3.1-8b \
        --batch1-tokens 256 --baseline transformers --num-prompts 1000 --input-len 1024 \
        --output-len 1024 --profile-idle --batch-sweep 1,8,32,128,256

Prompts are random token ids (seeded), generation ignores EOS so every
request yields exactly --output-len tokens. The engine gets every request at
once. The transformers baseline runs `generate` on static batches of
--baseline-batch-size on CPU; on GPU it is batch-1 decode (ms per token, the
prompt's prefill left out). benchmarks/roofline.py defines the yardsticks.
The last line printed is one JSON object.
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

from benchmarks import roofline  # noqa: E402
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from services.common.heap import freeze_startup_heap  # noqa: E402
from services.engine.engine import Engine  # noqa: E402
from services.engine import layers  # noqa: E402
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


def host_profile(prof, top: int = 25) -> list[dict]:
    """The functions by own (host) time of a cProfile.Profile, the heaviest first."""
    import pstats
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})" if line else fn, "calls": nc,
                     "own_ms": round(tt * 1e3, 3), "cum_ms": round(ct * 1e3, 3)})
    return sorted(rows, key=lambda r: -r["own_ms"])[:top]


def run_engine(engine: Engine, prompts: list[list[int]], out_len: int, progress: bool,
               profile_steps: int = 0, profile_host: int = 0, windows: int = 1,
               at_steps: list[int] | None = None) -> dict:
    """Every prompt at once, to the end. With profile_steps, a torch profiler records that
    many steps in `windows` windows spread over the run (window k of W starts when k/(W+1)
    of the output tokens are out; with at_steps, at those step indices instead, in order),
    merged into one idle share; with profile_host = K, cProfile
    records as many steps as a window right after window K (the host's own time by
    function). The profilers' own bookkeeping between steps (starting one, reading its trace
    back: ~1 s a window) is timed apart, `profiler_s`, and left out of the throughput
    figures; `wall_s` keeps it."""
    params = SamplingParams(temperature=0.0, max_new_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    first, last, count = {}, {}, 0
    total = len(prompts) * out_len
    bar = _bar(total, "engine", progress)
    if at_steps:
        windows = len(at_steps)
    marks = [total * (k + 1) // (windows + 1) for k in range(windows)] if profile_steps else []
    step_index = 0
    per_window = max(1, profile_steps // max(1, windows))
    prof, profiled, done, kinds = None, 0, [], []
    run_kinds: dict[str, dict] = {}             # every step's wall time, by roofline.step_kind
    cprof, host_steps, host = None, 0, {}
    profiler_s = 0.0                             # the profilers' bookkeeping, not the engine's work
    cuda = torch.cuda.is_available()

    def settle() -> float:
        """Wait for the steps in flight (their time is the run's), then start the clock."""
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    while engine.has_unfinished():
        if profile_host and len(done) >= profile_host and cprof is None and not host:
            import cProfile
            cprof, t_host = cProfile.Profile(), time.perf_counter()
            cprof.enable()
        if cprof is not None:
            host_steps += 1
            if host_steps > per_window or not engine.has_unfinished():
                cprof.disable()
                t_book = time.perf_counter()
                host = {"host_profile_steps": host_steps - 1,
                        "host_profile_wall_ms": round(1e3 * (t_book - t_host), 1),
                        "host_profile": host_profile(cprof)}
                cprof = None
                profiler_s += time.perf_counter() - t_book
        due = len(done) < len(marks) and (step_index >= at_steps[len(done)] if at_steps
                                          else count >= marks[len(done)])
        if prof is None and cprof is None and due:
            t_book = settle()
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            profiler_s += time.perf_counter() - t_book
        t_step = time.perf_counter()
        if prof is not None:
            with torch.profiler.record_function("engine_step"):
                outs = engine.step()
        else:
            outs = engine.step()
        now = time.perf_counter()
        step_index += 1
        kind = roofline.step_kind(engine.last_batch)
        d = run_kinds.setdefault(kind, {"steps": 0, "wall_s": 0.0})
        d["steps"] += 1
        d["wall_s"] += now - t_step
        if prof is not None:
            kinds.append(kind)
            profiled += 1
            if profiled == per_window or not engine.has_unfinished():
                t_book = settle()
                prof.__exit__(None, None, None)
                done.append(roofline.gpu_idle_share(prof, kinds=kinds))
                prof, profiled, kinds = None, 0, []
                profiler_s += time.perf_counter() - t_book
        for o in outs:
            first.setdefault(o.rid, now)
            last[o.rid] = now
        count += len(outs)
        bar.update(len(outs))
    if cprof is not None:                        # the run ended inside the host window
        cprof.disable()
        host = {"host_profile_steps": host_steps, "host_profile_wall_ms": round(1e3 * (time.perf_counter() - t_host), 1),
                "host_profile": host_profile(cprof)}
    bar.close()
    wall = time.perf_counter() - t0
    ttft = [first[r] - t0 for r in rids]
    tpot = [(last[r] - first[r]) / (out_len - 1) for r in rids] if out_len > 1 else [0.0]
    work = wall - profiler_s
    return {"wall_s": wall, "profiler_s": profiler_s, "output_tokens": count, "output_tok_s": count / work,
            "total_tok_s": (count + sum(map(len, prompts))) / work,
            "ttft_ms_median": 1e3 * statistics.median(ttft), "tpot_ms_median": 1e3 * statistics.median(tpot),
            "run_step_kinds": {k: {"steps": d["steps"], "wall_s": round(d["wall_s"], 3)} for k, d in run_kinds.items()},
            **roofline.merge_idle([d for d in done if d]), **host}


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


def transformers_batch1_gpu(source, input_len: int, out_len: int, vocab: int, seed: int) -> dict:
    """ms per decoded token of transformers' generate at batch 1, bf16, on the GPU: the time
    of out_len new tokens less the time of 1 (the prefill), over out_len - 1."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if source.load_format != "dummy":
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.bfloat16).cuda()
    else:
        hf = dict(source.hf_config)
        cfg = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    ids = torch.tensor(make_prompts(1, input_len, vocab, seed), device="cuda")

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - t

    gen(4)                                          # warm-up
    t1, tn = gen(1), gen(out_len)
    del model
    torch.cuda.empty_cache()
    return {"baseline": "transformers generate, batch 1, bf16", "baseline_input_len": input_len,
            "baseline_output_len": out_len, "baseline_ms_per_token": 1e3 * (tn - t1) / (out_len - 1)}


def batch1_decode(engine: Engine, input_len: int, out_len: int, vocab: int, seed: int, wbytes: int,
                  hw: dict | None, profile: bool = False) -> dict:
    """ms per token of one request decoding alone; with profile, a second run of it under
    the torch profiler gives the kernels of its steps (the first run's figure stays clean)."""
    prompt = make_prompts(1, input_len, vocab, seed + 7)
    r = run_engine(engine, prompt, out_len, False)
    out = {"batch1_input_len": input_len, "batch1_output_len": out_len, "batch1_ms_per_token": r["tpot_ms_median"]}
    if hw:
        floor = wbytes / (hw["bandwidth_GBs"] * 1e9) * 1e3
        out.update(batch1_roofline_ms=floor, batch1_roofline_pct=100 * floor / r["tpot_ms_median"])
    if profile:
        _reset_cache(engine)
        p = run_engine(engine, prompt, out_len, False, profile_steps=min(64, out_len // 2))
        out.update({f"batch1_{k}": p[k] for k in ("profiled_steps", "gpu_idle_share", "top_kernels") if k in p})
    return out


def batch_sweep(engine: Engine, sizes: list[int], input_len: int, out_len: int, vocab: int, seed: int,
                wbytes: int, hw: dict | None) -> list[dict]:
    """Decode tok/s of `b` requests decoding together: the b prompts are prefilled first
    (untimed), then `out_len` steps in which every request decodes are timed, so no mixed
    prefill + decode step counts; the requests are then aborted. Beside it, the HBM
    roofline of decode steps of b sequences at their mean context."""
    kvb = engine.model_config.kv_bytes_per_token(engine.kv.pool.dtype)
    cuda = engine.device.type == "cuda"
    chunk = engine.scheduler.cfg.chunked_prefill_size
    rows = []
    for b in sizes:
        if b > engine.config.scheduler.max_running_requests:
            print(f"batch {b}: over --max-running-requests, skipped", file=sys.stderr)
            continue
        _reset_cache(engine)
        # enough tokens to outlast the prefill of the others and the timed steps
        prefill_steps = b + b * input_len // max(1, chunk - b) + 2
        params = SamplingParams(temperature=0.0, max_new_tokens=out_len + prefill_steps + 2, ignore_eos=True)
        rids = [engine.add_request(p, params) for p in make_prompts(b, input_len, vocab, seed + b)]
        started: set[str] = set()
        while len(started) < b:
            started.update(o.rid for o in engine.step())
        engine.step()                                # the lagging output of the last prefill (overlap)
        if cuda:
            torch.cuda.synchronize()
        t0, count = time.perf_counter(), 0
        for _ in range(out_len):
            count += len(engine.step())
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        for rid in rids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        # the KV pool may hold fewer than b (the scheduler reserves room for each one's output)
        decoding = count / out_len
        row = {"batch": b, "rows": decoding, "decode_tok_s": count / dt, "step_ms": 1e3 * dt / out_len,
               "decode_steps": out_len}
        if hw:
            row["roofline_decode_tok_s"] = roofline.decode_roofline_tok_s(
                wbytes, kvb, decoding, input_len + prefill_steps / 2 + out_len / 2, hw["bandwidth_GBs"] * 1e9)
        rows.append(row)
        print(f"batch {b}: decode {row['decode_tok_s']:.0f} tok/s ({row['step_ms']:.2f} ms/step)"
              + (f" (roofline {row['roofline_decode_tok_s']:.0f})" if hw else "")
              + (f"; only {decoding:.0f} decoding at once (KV pool)" if decoding < 0.98 * b else ""),
              file=sys.stderr)
    return rows


def plot_sweep(rows: list[dict], title: str, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    rows = [r for r in rows if r.get("rows", r["batch"]) >= 0.98 * r["batch"]]   # not the pool-limited ones
    b = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(b, [r["decode_tok_s"] for r in rows], "o-", label="Tandem decode (pure decode steps)")
    if "roofline_decode_tok_s" in rows[0]:
        ax.plot(b, [r["roofline_decode_tok_s"] for r in rows], "--", color="gray",
                label="HBM roofline (weights + KV per step)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (requests decoding at once)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _reset_cache(engine: Engine) -> None:
    if engine.kv.cache is not None:     # timed prompts must not hit an earlier run's prefix
        engine.kv.cache.reset()


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
    ap.add_argument("--chunked-prefill-size", type=int, default=0, help="0: 2048 on GPU, 512 on CPU")
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--mem-fraction-static", type=float, default=CacheConfig.mem_fraction_static)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=EngineConfig.cuda_graph_max_bs)
    ap.add_argument("--piecewise-cuda-graph-max-tokens", type=int,
                    default=EngineConfig.piecewise_cuda_graph_max_tokens, help="0: prefill and mixed steps eager")
    ap.add_argument("--no-gemv", action="store_true",
                    help="batch-1 decode matmuls on cuBLAS, not kernels/triton's gemv (an A/B)")
    ap.add_argument("--disable-overlap", action="store_true",
                    help="CUDA: read each step's ids back before scheduling the next")
    ap.add_argument("--batch1-tokens", type=int, default=0,
                    help="batch-1 decode: tokens generated after a --batch1-input-len prompt (0: skip)")
    ap.add_argument("--batch1-input-len", type=int, default=128)
    ap.add_argument("--profile-idle", action="store_true",
                    help="torch profiler over --profile-steps steps of the throughput run, in "
                         "--profile-windows windows: GPU idle share")
    ap.add_argument("--profile-at-steps", default="",
                    help="comma-separated step indices where the profiler windows start, instead of "
                         "spreading --profile-windows over the output (mixed prefill + decode steps come "
                         "in waves: early, and where the first requests finish)")
    ap.add_argument("--profile-steps", type=int, default=50, help="steps profiled, over all windows")
    ap.add_argument("--profile-windows", type=int, default=4,
                    help="profiler windows spread over the run (window k of W at k/(W+1) of the output)")
    ap.add_argument("--profile-host", type=int, nargs="?", const=1, default=0, metavar="K",
                    help="with --profile-idle: cProfile over as many steps as a window, right after "
                         "window K (default 1), the host's own time by function")
    ap.add_argument("--batch-sweep", default="", help="comma-separated batch sizes (JSON + plot)")
    ap.add_argument("--sweep-input-len", type=int, default=1024)
    ap.add_argument("--sweep-output-len", type=int, default=128)
    ap.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="name of the files written to --results-dir")
    ap.add_argument("--baseline", choices=["transformers"], default=None)
    ap.add_argument("--baseline-batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=8,
                    help="warm-up requests before timing (several, so that mixed prefill + decode steps "
                         "compile their Triton kernels before the clock starts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON result to this file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    progress = not args.no_progress and os.environ.get("TANDEM_NO_PROGRESS") != "1"

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    cfg = EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
                       attention_backend=args.attention_backend, disable_cuda_graph=args.disable_cuda_graph,
                       cuda_graph_max_bs=args.cuda_graph_max_bs, disable_overlap=args.disable_overlap,
                       piecewise_cuda_graph_max_tokens=args.piecewise_cuda_graph_max_tokens,
                       cache=CacheConfig(page_size=args.page_size, max_total_tokens=args.max_total_tokens,
                                         mem_fraction_static=args.mem_fraction_static),
                       scheduler=SchedulerConfig(max_running_requests=args.max_running_requests,
                                                 chunked_prefill_size=args.chunked_prefill_size))
    if args.no_gemv:
        layers.GPU_GEMV_MAX_ROWS = 0
    result = {"bench": "offline", "model": args.model, "load_format": args.load_format,
              "gemv_max_rows": layers.GPU_GEMV_MAX_ROWS}
    hw = None
    if cuda:
        hw = {**roofline.measure_hbm(), **roofline.measure_matmul()}
        print(f"HBM {hw['bandwidth_GBs']:.0f} GB/s (copy {hw['copy_bw_GBs']:.0f}, sum {hw['read_sum_bw_GBs']:.0f}), "
              f"bf16 matmul {hw['bf16_TFLOPs']:.0f} TFLOP/s", file=sys.stderr)
        result["hardware"] = hw
    if args.baseline == "transformers" and cuda:       # before the engine takes the memory
        from services.engine.loader import resolve_model
        src = resolve_model(args.model, args.load_format)
        result.update(transformers_batch1_gpu(src, args.batch1_input_len, args.batch1_tokens or 128,
                                              src.model_config.vocab_size, args.seed))
    t = time.perf_counter()
    engine = Engine(cfg)
    load_s = time.perf_counter() - t
    vocab = engine.model_config.vocab_size
    model = engine.runner.model
    wbytes = roofline.weight_bytes(model)
    result.update({"dtype": str(model.embed_tokens.weight.dtype).replace("torch.", ""),
                   "device": str(engine.device), "attention_backend": type(engine.runner.backend).__name__,
                   "cuda_graphs": engine.runner.graphs is not None, "overlap": engine.executor.overlap,
                   "graph_routes": {b: to for b, to in getattr(engine.runner.graphs, "route", {}).items() if b != to},
                   "weight_bytes": wbytes,
                   "kv_pool_tokens": (engine.kv.allocator.num_pages - 1) * engine.kv.ps, "load_s": load_s})
    if args.warmup:
        run_engine(engine, make_prompts(args.warmup, args.input_len, vocab, args.seed + 1), 8, False)
        _reset_cache(engine)
    freeze_startup_heap()                       # as a worker does once it has started (services/common/heap.py)
    if args.batch1_tokens:
        result.update(batch1_decode(engine, args.batch1_input_len, args.batch1_tokens, vocab, args.seed,
                                    wbytes, hw, args.profile_idle and cuda))
        if "baseline_ms_per_token" in result:
            result["batch1_speedup_vs_transformers"] = result["baseline_ms_per_token"] / result["batch1_ms_per_token"]
        _report_batch1(result)
        _reset_cache(engine)
    if args.num_prompts:
        prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed)
        result.update({"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len})
        result.update(run_engine(engine, prompts, args.output_len, progress,
                                 args.profile_steps if args.profile_idle and cuda else 0,
                                 args.profile_host, args.profile_windows,
                                 [int(x) for x in args.profile_at_steps.split(",") if x]))
        if hw:
            mc = engine.model_config
            batch = min(args.max_running_requests,
                        result["kv_pool_tokens"] // (args.input_len + args.output_len))
            result.update(roofline.throughput_roofline(mc, wbytes, mc.kv_bytes_per_token(engine.kv.pool.dtype),
                                                       args.num_prompts, args.input_len, args.output_len,
                                                       batch, hw))
        _report_throughput(result)
        if args.baseline == "transformers" and not cuda:
            from services.engine.loader import resolve_model
            src = resolve_model(args.model, args.load_format)
            path = src.path if src.load_format != "dummy" else None
            result.update(run_transformers(engine, path, src.hf_config, prompts, args.output_len,
                                           args.baseline_batch_size, model.embed_tokens.weight.dtype,
                                           engine.device, progress))
            result["ratio"] = result["output_tok_s"] / result["baseline_output_tok_s"]
    result["machine"] = machine()
    result["command"] = " ".join(["python"] + sys.argv)
    results = Path(args.results_dir)
    tag = args.tag or f"offline_{Path(args.model).name}_{'gpu' if cuda else 'cpu'}"
    out = args.out or (str(results / f"{tag}.json") if cuda else None)
    if out and args.batch_sweep:                 # the figures so far survive a sweep that fails
        _write(out, json.dumps(result))
    if args.batch_sweep:
        sizes = [int(x) for x in args.batch_sweep.split(",")]
        result["sweep"] = batch_sweep(engine, sizes, args.sweep_input_len, args.sweep_output_len, vocab,
                                      args.seed, wbytes, hw)
        results.mkdir(parents=True, exist_ok=True)
        gpu = result["machine"].get("gpu", "CPU")
        title = (f"{args.model} (dummy bf16) on {gpu}: {args.sweep_input_len} -> {args.sweep_output_len} tokens"
                 if cuda else f"{args.model}: {args.sweep_input_len} -> {args.sweep_output_len} tokens")
        if plot_sweep(result["sweep"], title, results / f"{tag}_sweep.png"):
            result["sweep_plot"] = str(results / f"{tag}_sweep.png")
    line = json.dumps(result)
    if out:
        _write(out, line)
    print(line)


def _write(path: str, line: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(line + "\n")


def _report_batch1(r: dict) -> None:
    msg = f"batch-1 decode: {r['batch1_ms_per_token']:.2f} ms/token"
    if "batch1_roofline_ms" in r:
        msg += f"; roofline {r['batch1_roofline_ms']:.2f} ms (weights / bandwidth): {r['batch1_roofline_pct']:.0f}%"
    if "baseline_ms_per_token" in r:
        msg += f"; transformers {r['baseline_ms_per_token']:.1f} ms/token"
    print(msg, file=sys.stderr)


def _report_throughput(r: dict) -> None:
    msg = f"throughput: {r['output_tok_s']:.0f} output tok/s ({r['wall_s']:.1f} s"
    msg += f", {r['profiler_s']:.1f} s of it the profilers' bookkeeping, left out)" if r.get("profiler_s") else ")"
    if "roofline_tok_s_serial" in r:
        msg += (f"; roofline {r['roofline_tok_s_serial']:.0f} (prefill {r['roofline_prefill_s']:.1f} s + decode "
                f"{r['roofline_decode_s']:.1f} s at batch {r['roofline_batch']}) to "
                f"{r['roofline_tok_s_overlapped']:.0f} (prefill hidden)")
    if "gpu_idle_share" in r:
        msg += f"; GPU idle {100 * r['gpu_idle_share']:.1f}% over {r['profiled_steps']} steps"
        if len(r.get("window_idle_shares", [])) > 1:
            msg += " (windows: " + ", ".join(f"{100 * x:.0f}%" for x in r["window_idle_shares"]) + ")"
    for kind, d in r.get("step_kinds", {}).items():
        msg += (f"\n  profiled {kind} steps: {d['steps']}, {d['wall_ms'] / max(1, d['steps']):.2f} ms each, "
                f"GPU idle {100 * d['idle_ms'] / max(d['wall_ms'], 1e-9):.0f}% of them")
    for kind, d in r.get("run_step_kinds", {}).items():
        msg += f"\n  whole run, {kind} steps: {d['steps']}, {d['wall_s']:.1f} s"
    for k in r.get("top_kernels", [])[:8]:
        msg += f"\n  {100 * k['share']:5.1f}% {k['ms']:9.1f} ms {k['calls']:6d}x  {k['name']}"
    if "host_profile" in r:
        msg += (f"\nhost (cProfile, {r['host_profile_steps']} steps, {r['host_profile_wall_ms']:.0f} ms), "
                f"own time:")
        for f in r["host_profile"][:12]:
            msg += f"\n  {f['own_ms']:9.1f} ms {f['calls']:7d}x  {f['function']}"
    print(msg, file=sys.stderr)


if __name__ == "__main__":
    main()
