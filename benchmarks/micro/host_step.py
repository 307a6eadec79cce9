"""The engine's host work per decode step, with the model taken out.

A tiny dummy Llama on CPU whose runner is replaced by a stub: the stub builds
the step's arrays as the paged runner does (StepArrays.build with the page
table) and returns zero logits, so a step costs what the scheduler, the
sampling batch, the step arrays and postprocessing cost, nothing else. With
B requests of --prompt-len tokens (the tiny model holds 1024) decoding, it prints the median wall time of
a step and, with --profile, the heaviest functions (cProfile). On a GPU this
is the host time each decode step must hide under the device's.

    python benchmarks/micro/host_step.py --batch 512 --steps 200 [--profile]
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
    a = ap.parse_args()
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    main()
