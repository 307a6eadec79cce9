"""Runs the engine on its own thread and talks to asyncio.

The engine is plain synchronous code; the gRPC handlers live on the event
loop. Between two steps the engine thread runs the commands the handlers sent
(add a request, abort, reserve pages, ...); after each step it hands every new
output to its request's sink and every KV event to the subscribers, in one
call_soon_threadsafe per step.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import traceback
from typing import Any, Callable

import torch

from services.engine.engine import Engine, StepOutput

from .step_threads import StepThreads

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class EngineLoop:
    def __init__(self, engine: Engine, aio: asyncio.AbstractEventLoop):
        self.engine = engine
        self.aio = aio
        self.sinks: dict[str, Any] = {}        # rid -> where its outputs go (put_nowait), event-loop side
        self.subscribers: set[asyncio.Queue] = set()          # KV event lists, event-loop side
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self.num_steps = 0
        from . import metrics
        self.step_seconds = metrics.STEP_SECONDS

    # -- event-loop side -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(None)
        self._thread.join(timeout=10)

    async def call(self, fn: Callable, *args, **kwargs) -> Any:
        """Run fn on the engine thread between steps; its result or exception."""
        fut = self.aio.create_future()
        self._cmds.put((fn, args, kwargs, fut))
        return await fut

    def post(self, fn: Callable, *args, **kwargs) -> None:
        """Fire and forget (safe from a cancelled task's finally block)."""
        self._cmds.put((fn, args, kwargs, None))

    def open_sink(self, rid: str, sink: Any = None) -> Any:
        """Route rid's outputs to sink (an asyncio.Queue unless given: anything with put_nowait)."""
        if sink is None:
            sink = asyncio.Queue()
        self.sinks[rid] = sink
        return sink

    def close_sink(self, rid: str) -> None:
        self.sinks.pop(rid, None)

    def _deliver(self, outputs: list[StepOutput], events: list) -> None:
        for out in outputs:
            q = self.sinks.get(out.rid)
            if q is not None:
                q.put_nowait(out)
        if events:
            for sub in self.subscribers:
                sub.put_nowait(events)

    @staticmethod
    def _resolve(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
        if fut.cancelled():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    # -- engine thread ---------------------------------------------------------------------------
    def emit(self, outputs: list[StepOutput]) -> None:
        """From a command: hand outputs to their sinks, in order with the step outputs."""
        self.aio.call_soon_threadsafe(self._deliver, outputs, [])

    def _run(self) -> None:
        cache = self.engine.kv.cache
        threads = None
        if (self.engine.device.type == "cpu" and torch.get_num_threads() > 1
                and os.environ.get("TANDEM_STEP_THREADS", "1") != "0"):
            threads = StepThreads(torch.get_num_threads())
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            outputs: list[StepOutput] = []
            if self.engine.has_unfinished():
                try:
                    if threads is not None:
                        threads.before_step(self.engine.scheduler)
                    t0 = time.perf_counter()
                    outputs = self.engine.step()
                    self.step_seconds.observe(time.perf_counter() - t0)
                    self.num_steps += 1
                except Exception:                      # a bug: fail what runs, keep serving
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    outputs = self._fail_all()
            events = cache.drain_events() if cache is not None and cache.enable_events else []
            if outputs or events:
                self.aio.call_soon_threadsafe(self._deliver, outputs, events)

    def _run_commands(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=_IDLE_WAIT_S) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while cmd is not None:
            fn, args, kwargs, fut = cmd
            result, exc = None, None
            try:
                result = fn(*args, **kwargs)
            except Exception as e:                       # handed to the caller
                exc = e
                if fut is None:
                    log.warning("engine command %s failed: %s", getattr(fn, "__name__", fn), e)
            if fut is not None:
                self.aio.call_soon_threadsafe(self._resolve, fut, result, exc)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _fail_all(self) -> list[StepOutput]:
        failed = []
        for req in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(req.rid)
            failed.append(StepOutput(req.rid, [], True, "error"))
        return failed
