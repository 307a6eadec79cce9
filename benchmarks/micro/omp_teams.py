#!/usr/bin/env python3
"""Why a worker's engine thread builds its own engine (services/worker/engine_loop.py).

Builds SmolLM2 (fp32) on the main thread, which stays alive with its OpenMP
team (`second-team`), or on a thread that exits before decoding (`one-team`),
then times decode steps of 16 requests on a new thread. On the 2-core Zen 3
of 2026-12-01: second-team 149-154 ms a step, one-team 65-75 ms.

    python benchmarks/micro/omp_teams.py second-team
    python benchmarks/micro/omp_teams.py one-team
"""
import sys
import threading
import time

from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.sampling_params import SamplingParams

mode = sys.argv[1] if len(sys.argv) > 1 else "second-team"
holder = {}


def build():
    e = Engine(EngineConfig(model="smollm2-135m-instruct", dtype="float32"))
    e.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.0))
    holder["engine"] = e


if mode == "one-team":
    t = threading.Thread(target=build)
    t.start()
    t.join()
else:
    build()
eng = holder["engine"]


def run():
    for i in range(16):
        eng.add_request([(7 * i + j) % 30000 + 100 for j in range(256)],
                        SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished() and eng.scheduler.waiting:
        eng.step()
    eng.step()
    eng.step()
    t0, n = time.perf_counter(), 0
    while eng.has_unfinished():
        eng.step()
        n += 1
    print(f"{mode}: decode step of 16 requests {(time.perf_counter() - t0) / n * 1e3:.1f} ms over {n} steps")


t = threading.Thread(target=run)
t.start()
t.join()
