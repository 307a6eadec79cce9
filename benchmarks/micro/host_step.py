"""The engine's host work per decode step, with the model taken out.

A tiny dummy Llama on CPU whose runner is replaced by a stub: the stub builds
the step's arrays as the paged runner does (StepArrays.build with the page
table) and returns zero logits, so a step costs what the scheduler, the
sampling batch, the step arrays and postprocessing cost, nothing else. With
B requests of --prompt-len tokens (the tiny model holds 1024) decoding, it prints the median wall time of
a step and, with --profile, the heaviest functions (cProfile). On a GPU this
is the host time each decode step must hide under the device's.

    python benchmarks/micro/host_step.py --batch 512 --steps 200 [--profile]

With --workload N,IN,OUT it runs offline.py's whole workload instead (N prompts of
IN random ids, OUT tokens each, all at once, --batch running at most, --chunk tokens a
step) and prints the host time of its steps by kind (decode only, mixed) and the
slowest ones with what they held: where the host falls behind the device.

    python benchmarks/micro/host_step.py --workload 1000,1024,1024 --batch 512 --chunk 2048
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from services.common.heap import freeze_startup_heap  # noqa: E402
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from services.engine.engine import Engine  # noqa: E402
from services.engine.page_table import PageTable  # noqa: E402
from services.engine.runner import StepArrays  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402


class _StubRunner:
    """The paged runner's host half (StepArrays + page table), no forward."""

    def __init__(self, real, vocab: int):
        self.real, self.vocab = real, vocab
        self.page_table = PageTable(torch.device("cpu"))
        self.futures = real.futures

    def run(self, batch):
        StepArrays.build(batch.chunks, self.real.ps, self.page_table, False)
        n = sum(c.sample for c in batch.chunks)
        return torch.zeros(n, self.vocab)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def forget(self, req):
        self.page_table.release(req)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=768)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--waiting", type=int, default=0, help="requests left waiting (a full engine)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--workload", help="N,IN,OUT: the offline workload, whole")
    ap.add_argument("--chunk", type=int, default=2048, help="with --workload: the step's token budget")
    ap.add_argument("--no-freeze", action="store_true",
                    help="with --workload: leave the start-up heap to the collector (services/common/heap.py)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.workload:
        return workload(a, *(int(x) for x in a.workload.split(",")))
    n = a.batch + a.waiting
    tokens = (a.prompt_len + a.steps + 64) * n
    import tempfile
    from pathlib import Path
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
    from tests.reference import make_tiny_checkpoint
    folder = make_tiny_checkpoint("llama", Path(tempfile.mkdtemp(prefix="host_step_")))
    cfg = EngineConfig(model=str(folder), dtype="float32", device="cpu", attention_backend="torch",
                       max_model_len=a.prompt_len + a.steps + 64,
                       cache=CacheConfig(max_total_tokens=tokens),
                       scheduler=SchedulerConfig(max_running_requests=a.batch, chunked_prefill_size=1 << 20))
    engine = Engine(cfg)
    engine.runner = _StubRunner(engine.runner, engine.model_config.vocab_size)
    engine.executor.runner = engine.runner
    params = SamplingParams(temperature=0.0, max_new_tokens=a.steps + 32, ignore_eos=True)
    for i in range(n):
        engine.add_request([100 + (i * 7 + j) % 200 for j in range(a.prompt_len)], params)
    while any(not r.is_decoding for r in engine.scheduler.running) or len(engine.scheduler.running) < a.batch:
        engine.step()
    times = []
    prof = cProfile.Profile() if a.profile else None
    for _ in range(a.steps):
        if prof:
            prof.enable()
        t = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t)
        if prof:
            prof.disable()
        assert len(outs) == a.batch, len(outs)
    print(f"batch {a.batch}, {a.waiting} waiting: host step {1e3 * statistics.median(times):.2f} ms median "
          f"({1e6 * statistics.median(times) / a.batch:.1f} us a request), over {a.steps} steps")
    if prof:
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "18")))


def stub_engine(max_len: int, tokens: int, batch: int, chunk: int) -> Engine:
    """An engine on a tiny Llama whose runner is the stub."""
    import json
    import tempfile
    from pathlib import Path
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
    from tests.reference import make_tiny_checkpoint
    folder = make_tiny_checkpoint("llama", Path(tempfile.mkdtemp(prefix="host_step_")))
    conf = json.loads((folder / "config.json").read_text())
    conf["max_position_embeddings"] = max(conf["max_position_embeddings"], max_len)
    (folder / "config.json").write_text(json.dumps(conf))
    cfg = EngineConfig(model=str(folder), dtype="float32", device="cpu", attention_backend="torch",
                       max_model_len=max_len, cache=CacheConfig(max_total_tokens=tokens),
                       scheduler=SchedulerConfig(max_running_requests=batch, chunked_prefill_size=chunk))
    engine = Engine(cfg)
    engine.runner = _StubRunner(engine.runner, engine.model_config.vocab_size)
    engine.executor.runner = engine.runner
    return engine


def workload(a, n: int, in_len: int, out_len: int) -> None:
    import gc
    import random
    engine = stub_engine(in_len + out_len + 16, n * (in_len + out_len), a.batch, a.chunk)
    if not a.no_freeze:
        freeze_startup_heap()
    pauses: list[float] = []
    t_gc = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                t_gc[0] = time.perf_counter()
            else:
                pauses.append(time.perf_counter() - t_gc[0])
    gc.callbacks.append(on_gc)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_new_tokens=out_len, ignore_eos=True)
    for _ in range(n):
        engine.add_request([rng.randrange(100, 500) for _ in range(in_len)], params)
    steps, t_all = [], time.perf_counter()
    sched = engine.scheduler
    while engine.has_unfinished():
        running = len(sched.running)
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        steps.append((dt, running, len(outs), len(sched.waiting)))
    wall = time.perf_counter() - t_all
    print(f"{n} x {in_len} -> {out_len}, batch {a.batch}, chunk {a.chunk}: {len(steps)} steps, host {wall:.1f} s")
    for name, keep in (("all", lambda s: True), ("full decode", lambda s: s[1] == a.batch and s[3] == 0),
                       ("with waiting", lambda s: s[3] > 0)):
        ts = sorted(s[0] for s in steps if keep(s))
        if ts:
            print(f"  {name:>13}: {len(ts):5d} steps, median {1e3 * ts[len(ts) // 2]:.2f} ms, "
                  f"p90 {1e3 * ts[int(len(ts) * .9)]:.2f} ms, sum {sum(ts):.1f} s")
    print(f"  full gc collections: {len(pauses)}, longest {1e3 * max(pauses, default=0):.1f} ms, "
          f"total {1e3 * sum(pauses):.0f} ms (heap {'not ' if a.no_freeze else ''}frozen at start)")
    print("  slowest steps (ms, running before, outputs, waiting after, step index):")
    for i in sorted(range(len(steps)), key=lambda i: -steps[i][0])[:12]:
        dt, running, outs, waiting = steps[i]
        print(f"    {1e3 * dt:7.2f} {running:5d} {outs:5d} {waiting:5d} {i:6d}")


if __name__ == "__main__":
    main()
