"""services/worker/step_threads.py: small decode-only steps get one thread, the rest all."""
from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import torch

from services.worker.step_threads import StepThreads


def _sched(decoding: list[bool], waiting: int = 0):
    return SimpleNamespace(running=[SimpleNamespace(is_decoding=d) for d in decoding],
                           waiting=deque(range(waiting)))


def test_small_decode_steps_run_on_one_thread():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        t = StepThreads(2, small_batch=4)
        t.before_step(_sched([True]))
        assert torch.get_num_threads() == 1
        t.before_step(_sched([True] * 4))
        assert torch.get_num_threads() == 1
        t.before_step(_sched([True] * 5))                 # a bigger batch: compute-bound
        assert torch.get_num_threads() == 2
        t.before_step(_sched([True, False]))              # a prefill chunk in the step
        assert torch.get_num_threads() == 2
        t.before_step(_sched([True]))
        t.before_step(_sched([True], waiting=1))          # a prompt about to be admitted
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
