"""`tandem worker`: one engine behind the Worker gRPC service.

Loads the model, warms it up, then serves Worker, grpc.health.v1 and server
reflection on grpc.aio (uvloop). SIGTERM or SIGINT drains: health turns
NOT_SERVING, KV event streams end, new calls are refused, in-flight ones get
drain_timeout_s to finish, then the process exits.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

from services.common.grpc_utils import start_server
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("tandem.worker")

ROLES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class WorkerConfig:
    role: str = "both"                  # prefill | decode | both
    host: str = "127.0.0.1"
    port: int = 50061
    metrics_port: int = 0               # Prometheus /metrics over HTTP; 0: off
    decode_stream_port: int = 0         # DecodeStream over framed TCP (gateways' fast path); 0: any free port, -1: off
    served_model_name: str = ""         # default: the --model value
    transfer_backend: str = "grpc"
    prefill_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    threads: int = 0                    # torch intra-op threads; 0: torch's default (all cores)


def _build_engine(ecfg, threads: int):
    """On the engine thread (see engine_loop): torch's thread count is per calling thread."""
    import torch

    from services.common.heap import freeze_startup_heap
    from services.engine.engine import Engine
    from services.engine.sampling_params import SamplingParams
    if threads > 0:
        torch.set_num_threads(threads)
    engine = Engine(ecfg)
    # Warm-up: the first forward loads kernels and allocates; do it before serving.
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.0))
    if engine.kv.cache is not None:
        engine.kv.cache.reset()
        engine.kv.cache.drain_events()
    freeze_startup_heap()
    return engine


async def serve(wcfg: WorkerConfig, ecfg) -> None:
    import dataclasses

    from services.transfer import KvLayout, get_backend

    from . import metrics
    from .engine_loop import EngineLoop
    from .servicer import WorkerServicer
    from .state import WorkerState

    if wcfg.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {wcfg.role!r}")
    t0 = time.perf_counter()
    ecfg = dataclasses.replace(ecfg, cache=dataclasses.replace(ecfg.cache, kv_events=True))
    loop = EngineLoop(asyncio.get_running_loop())
    engine = await loop.start(lambda: _build_engine(ecfg, wcfg.threads))
    pool = engine.kv.pool
    layout = KvLayout(pool.num_layers, pool.num_kv_heads, pool.head_dim, str(pool.dtype).removeprefix("torch."))
    state = WorkerState(loop=loop, role=wcfg.role, transfer=get_backend(wcfg.transfer_backend, layout),
                        prefill_timeout_s=wcfg.prefill_timeout_s)

    stream_server = None
    if wcfg.role != "prefill" and wcfg.decode_stream_port >= 0:
        from services.decode.stream_tcp import DecodeStreamServer
        stream_server = DecodeStreamServer(state)
        state.decode_stream_port = await stream_server.start(wcfg.host, wcfg.decode_stream_port)
        if not state.decode_stream_port:
            stream_server = None
    address = f"{wcfg.host}:{wcfg.port}"
    server, health_servicer = await start_server(
        address, worker_pb2.DESCRIPTOR.services_by_name["Worker"], worker_pb2_grpc.add_WorkerServicer_to_server,
        WorkerServicer(state, wcfg.served_model_name or ecfg.model))
    if wcfg.metrics_port:
        from prometheus_client import start_http_server
        metrics.bind_engine(engine.load)
        start_http_server(wcfg.metrics_port, addr=wcfg.host)
    log.warning("worker %s (role %s, model %s) serving on %s%s%s after %.1f s", state.worker_id, wcfg.role,
                ecfg.model, address, f", decode stream on :{state.decode_stream_port}" if stream_server else "",
                f", metrics on :{wcfg.metrics_port}" if wcfg.metrics_port else "", time.perf_counter() - t0)

    stop = asyncio.Event()
    aio = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.warning("worker %s draining (up to %.0f s)", state.worker_id, wcfg.drain_timeout_s)
    state.draining = True
    await health_servicer.enter_graceful_shutdown()
    for q in list(loop.subscribers):
        q.put_nowait(None)
    for s in list(state.streams):
        s.wake.set()                        # a stream with nothing running ends now
    stops = [server.stop(grace=wcfg.drain_timeout_s)]
    if stream_server is not None:
        stops.append(stream_server.stop(wcfg.drain_timeout_s))
    await asyncio.gather(*stops)
    loop.stop()
    log.warning("worker %s stopped", state.worker_id)
