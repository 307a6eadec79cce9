"""Runs the engine on its own thread and talks to asyncio.

The engine is plain synchronous code; the gRPC handlers live on the event
loop. Between two steps the engine thread runs the commands the handlers sent
(add a request, abort, reserve pages, ...); after each step it hands every new
output to its request's sink and every KV event to the subscribers, in one
call_soon_threadsafe per step.

The engine thread also builds the engine and runs every step: every torch op
that uses OpenMP threads runs on it (the event loop only reshapes and copies
transferred KV bytes). OpenMP keeps a thread team per calling thread, and
libgomp stops spinning (sleeps on a futex at every barrier) once its teams
hold more threads than there are cores; a model loaded on another thread that stays
alive left a second team and made every CPU step ~1.6x slower (workload A of
issue 3, decode steps of 16 requests: 125 ms served against 79 ms offline).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
import traceback
from typing import Any, Callable

from services.engine.engine import Engine, StepOutput

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class EngineLoop:
    def __init__(self, aio: asyncio.AbstractEventLoop):
        self.engine: Engine | None = None          # set by start()
        self.aio = aio
        self.sinks: dict[str, Any] = {}        # rid -> where its outputs go (put_nowait), event-loop side
        self.subscribers: set[asyncio.Queue] = set()          # KV event lists, event-loop side
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_steps = 0
        from . import metrics
        self.step_seconds = metrics.STEP_SECONDS
        trace = os.environ.get("TANDEM_STEP_TRACE")     # a JSON line per step, for diagnosing schedules
        self._trace = open(trace, "a", buffering=1) if trace else None

    # -- event-loop side -------------------------------------------------------------------------
    async def start(self, build: Callable[[], Engine]) -> Engine:
        """Start the engine thread; it runs build() and then the engine. The built engine."""
        ready = self.aio.create_future()
        self._thread = threading.Thread(target=self._main, args=(build, ready), name="tandem-engine",
                                        daemon=True)
        self._thread.start()
        return await ready

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._trace is not None:
            self._trace.close()

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

    def _main(self, build: Callable[[], Engine], ready: asyncio.Future) -> None:
        try:
            self.engine = build()
        except BaseException as e:
            self.aio.call_soon_threadsafe(self._resolve, ready, None, e)
            return
        self.aio.call_soon_threadsafe(self._resolve, ready, self.engine, None)
        self._run()

    def _run(self) -> None:
        cache = self.engine.kv.cache
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            outputs: list[StepOutput] = []
            if self.engine.has_unfinished():
                try:
                    t0 = time.perf_counter()
                    outputs = self.engine.step()
                    dt = time.perf_counter() - t0
                    self.step_seconds.observe(dt)
                    self.num_steps += 1
                except Exception:                      # a bug: fail what runs, keep serving
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    outputs = self._fail_all()
                else:
                    if self._trace is not None:
                        self._trace_step(t0, dt)
            events = cache.drain_events() if cache is not None and cache.enable_events else []
            if outputs or events:
                self.aio.call_soon_threadsafe(self._deliver, outputs, events)

    def _trace_step(self, t0: float, dt: float) -> None:
        batch, sched = self.engine.last_batch, self.engine.scheduler
        chunks = batch.chunks if batch is not None else ()
        try:
            self._trace.write(json.dumps({
                "t": round(t0, 4), "dt": round(dt, 4),
                "decode": sum(1 for c in chunks if c.n == 1),
                "prefill_tokens": sum(c.n for c in chunks if c.n > 1),
                "running": len(sched.running), "waiting": len(sched.waiting)}) + "\n")
        except OSError as e:                           # tracing is a diagnostic: never fail a step for it
            log.warning("step trace off: %s", e)
            self._trace = None

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
