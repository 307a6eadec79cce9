"""`tandem gateway`: the Tandem gRPC service and the REST bridge in one process.

One event loop (uvloop) serves both: grpc.aio for Tandem, uvicorn (httptools)
for REST. Workers are connected in the background; /health says 503 until a
prefill-capable and a decode-capable worker are ready. SIGTERM/SIGINT stop
accepting, let in-flight requests finish (up to 30 s), and exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn

from services.common.grpc_utils import start_server
from services.common.heap import freeze_startup_heap
from tandem.v1 import tandem_pb2, tandem_pb2_grpc

from .config import GatewayConfig
from .core import Gateway
from .grpc_api import TandemServicer
from .rest import build_app

log = logging.getLogger("tandem.gateway")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):           # the gateway handles signals itself
        yield


async def serve(cfg: GatewayConfig) -> None:
    gw = Gateway(cfg)
    await gw.start()
    grpc_server = health_servicer = None
    if cfg.grpc_port:
        grpc_server, health_servicer = await start_server(
            f"{cfg.host}:{cfg.grpc_port}", tandem_pb2.DESCRIPTOR.services_by_name["Tandem"],
            tandem_pb2_grpc.add_TandemServicer_to_server, TandemServicer(gw))
    http = _Uvicorn(uvicorn.Config(build_app(gw), host=cfg.host, port=cfg.port, loop="none", http="httptools",
                                   lifespan="off", access_log=False, log_level="warning", proxy_headers=False,
                                   server_header=False, date_header=False,
                                   timeout_keep_alive=60, backlog=4096))
    freeze_startup_heap()            # full collections skip what start-up created (services/common/heap.py)
    http_task = asyncio.create_task(http.serve())
    log.warning("gateway: REST on http://%s:%d%s, policy %s, %d workers", cfg.host, cfg.port,
                f", gRPC on {cfg.host}:{cfg.grpc_port}" if cfg.grpc_port else "", cfg.policy, len(cfg.worker))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), http_task],
                                 return_when=asyncio.FIRST_COMPLETED)
    if http_task in done and http_task.exception():
        raise http_task.exception()
    log.warning("gateway: draining")
    http.should_exit = True
    if grpc_server is not None:
        await health_servicer.enter_graceful_shutdown()
        await grpc_server.stop(grace=30)
    await asyncio.wait_for(http_task, timeout=35)
    await gw.close()
