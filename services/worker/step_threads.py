"""CPU only: how many torch threads each engine step gets.

A decode step of a few requests reads every weight once and is bound by
memory bandwidth, which one core of this VM nearly saturates; with two
threads, each parallel region waits at its barrier whenever another process
on the machine (the gateway, a client) holds one of the cores. Workload C of
issue 3 (one request at a time, collocated, 2 cores): TPOT 19.3 ms with 2
threads, 15.7 ms with 1 (Zen 4, bf16); on a Zen 3 (AVX2, fp32 with GGUF
block matmuls) 40.6 ms with 2 and 29.3 ms with 1, although offline the
matmuls alone run 2x faster on 2 threads. Prefill chunks and larger decode
batches keep every thread. TANDEM_STEP_THREADS=0 turns this off.
"""
from __future__ import annotations

import torch

SMALL_DECODE_BATCH = 4        # decode-only steps of at most this many requests run on one thread


class StepThreads:
    def __init__(self, full: int, small_batch: int = SMALL_DECODE_BATCH):
        self.full = full
        self.small_batch = small_batch
        self.current = full

    def before_step(self, scheduler) -> None:
        """Call on the engine thread (OpenMP thread counts are per calling thread)."""
        running = scheduler.running
        small = (not scheduler.waiting and len(running) <= self.small_batch
                 and all(r.is_decoding for r in running))
        n = 1 if small else self.full
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n
