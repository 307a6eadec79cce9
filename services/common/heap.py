"""Keep Python's cyclic garbage collector off the objects a process starts with.

A full (generation 2) collection walks every tracked object. After torch,
transformers and a model are imported and loaded, a process holds some 370k of
them, and a full collection took 200-250 ms (benchmarks/micro/host_step.py
--workload, 2-core Zen 3): on a GPU engine that is a stall of 10-20 decode
steps, several times a run, with the device idle. `gc.freeze()` moves what
exists now to a permanent generation that collections skip (refcounting still
frees it); a full collection of what serving creates then took 14-20 ms at most
(benchmarks/results/host_step_zen3.md).

What serving creates is mostly the requests' token lists, and a collection
walks every element of a list: 1000 requests of 2048 ids took 25 ms, and with
the default thresholds one came every ~133 engine steps. So a full collection
is also made 10x rarer (its threshold, the young collections between two full
ones, from 10 to FULL_EVERY): cyclic garbage is still found young, where it
nearly all dies, and what reaches the old generation waits longer.

Called once, by the process that serves (worker, gateway, offline benchmark),
after its start-up is done: an Engine does not freeze the heap itself, since a process
that builds engine after engine (tests) would freeze the cycles of the old ones.
"""
from __future__ import annotations

import gc

FULL_EVERY = 100          # generation-1 collections between two full ones (CPython's default: 10)


def freeze_startup_heap() -> int:
    """Collect, freeze everything left, make full collections rarer; returns how many
    objects were frozen."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_EVERY)
    return gc.get_freeze_count()
