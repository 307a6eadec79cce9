"""Keep Python's cyclic garbage collector off the objects a process starts with.

A full (generation 2) collection walks every tracked object. After torch,
transformers and a model are imported and loaded, a process holds some 370k of
them, and a full collection took 200-250 ms (benchmarks/micro/host_step.py
--workload, 2-core Zen 3): on a GPU engine that is a stall of 10-20 decode
steps, several times a run, with the device idle. `gc.freeze()` moves what
exists now to a permanent generation that collections skip (refcounting still
frees it); a full collection of what serving creates then took 14-20 ms at most
(benchmarks/results/host_step_zen3.md).

Called once, by the process that serves (worker, gateway, offline benchmark),
after its start-up is done: an Engine does not freeze the heap itself, since a process
that builds engine after engine (tests) would freeze the cycles of the old ones.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze everything left; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
