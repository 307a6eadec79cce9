"""Engine decode-step time at batch B with this tree's CPU kernels, optionally A/B against
another build of kernels/cpu (e.g. the previous gemv), both engines in one process and
their steps interleaved (the box is shared: noise hits both alike).

    python benchmarks/micro/cpu_gemv_step.py --batches 1,4,16,32,64
    python benchmarks/micro/cpu_gemv_step.py --ab OLD_DIR --batches 16,32
    # benchmarks/offline.py run on the kernels built from OLD_DIR (same flags as offline.py):
    python benchmarks/micro/cpu_gemv_step.py --ab OLD_DIR --offline -- --num-prompts 64 ...

OLD_DIR holds the sources of kernels/cpu (git show <rev>:kernels/cpu/<file> > OLD_DIR/<file>).
A step is Engine.step() of a pure decode batch (256-token prompts, then B tokens a step).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import kernels.cpu as kc  # noqa: E402
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from services.engine.engine import Engine  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402


def use_kernels(mod) -> None:
    """Route kernels.cpu's wrappers to `mod` (None: this tree's build). The old packed layout
    asked N % 4 and K % 32; the wrappers read _ext() at call time."""
    kc._ext = kc._ext_own if mod is None else (lambda: mod)
    kc.can_pack = kc._can_pack_own if mod is None else (
        lambda w: w.dtype == torch.bfloat16 and w.dim() == 2 and w.shape[0] % 4 == 0 and w.shape[1] % 32 == 0)


def decode_engine(model: str, batch: int) -> Engine:
    """An engine holding `batch` requests, all past prefill."""
    eng = Engine(EngineConfig(model=model, cache=CacheConfig(max_total_tokens=batch * 800),
                              scheduler=SchedulerConfig(max_running_requests=batch)))
    params = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)
    for i in range(batch):
        eng.add_request([100 + (i * 7919 + j * 31) % 40000 for j in range(256)], params)
    while len(eng.step()) < batch:
        pass
    return eng


def step_times(model: str, batches: list[int], ab, steps: int) -> None:
    print(f"{'B':>3} " + " ".join(f"{n + ' ms median (min)':>26}" for n in (["gemv"] + (["gemv_ab"] if ab else []))))
    for b in batches:
        engines = {}
        for name, mod in [("gemv", None)] + ([("gemv_ab", ab)] if ab else []):
            use_kernels(mod)
            engines[name] = decode_engine(model, b)
        ts = {n: [] for n in engines}
        for _ in range(steps):
            for name, eng in engines.items():
                use_kernels(None if name == "gemv" else ab)
                t0 = time.perf_counter()
                eng.step()
                ts[name].append((time.perf_counter() - t0) * 1e3)
        print(f"{b:3d} " + " ".join(f"{statistics.median(v):17.2f} ({min(v):6.2f})" for v in ts.values()), flush=True)
        use_kernels(None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ab", help="directory of another kernels/cpu source copy")
    ap.add_argument("--offline", action="store_true", help="run benchmarks/offline.py (args after --) on --ab's kernels")
    args, rest = ap.parse_known_args()
    kc._ext_own, kc._can_pack_own = kc._ext, kc.can_pack
    from micro.cpu_gemv import load_ab
    ab = load_ab(args.ab) if args.ab else None
    if args.offline:
        import offline
        use_kernels(ab)
        sys.argv = ["benchmarks/offline.py"] + [a for a in rest if a != "--"]
        offline.main()
        return
    step_times(args.model, [int(b) for b in args.batches.split(",")], ab, args.steps)


if __name__ == "__main__":
    main()
