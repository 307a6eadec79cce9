"""services/worker/engine_loop.py: the engine is built, run and commanded on one thread.

That thread is the only one of a worker that runs torch ops: a second thread
with its own OpenMP team makes libgomp sleep at every barrier (see the
module's docstring), so the build must not happen on an executor thread.
"""
import asyncio
import threading
from types import SimpleNamespace

import pytest

from services.worker.engine_loop import EngineLoop


class _IdleEngine:
    kv = SimpleNamespace(cache=None)

    def __init__(self):
        self.built_on = threading.current_thread()

    def has_unfinished(self):
        return False


def test_build_and_commands_run_on_the_engine_thread():
    async def go():
        loop = EngineLoop(asyncio.get_running_loop())
        engine = await loop.start(_IdleEngine)
        try:
            ran_on = await loop.call(threading.current_thread)
        finally:
            loop.stop()
        return engine, ran_on

    engine, ran_on = asyncio.run(go())
    assert engine.built_on is ran_on
    assert ran_on.name == "tandem-engine" and ran_on is not threading.main_thread()


def test_a_failed_build_raises_from_start():
    def build():
        raise RuntimeError("no such model")

    async def go():
        loop = EngineLoop(asyncio.get_running_loop())
        try:
            await loop.start(build)
        finally:
            loop.stop()

    with pytest.raises(RuntimeError, match="no such model"):
        asyncio.run(go())
