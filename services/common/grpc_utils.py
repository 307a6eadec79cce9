"""gRPC options and helpers shared by every service (no torch here: the gateway uses it)."""
from __future__ import annotations

import asyncio
import os
import logging

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Long token streams stay up behind NATs and idle timeouts; large KV chunks fit.
_COMMON = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = _COMMON + [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = _COMMON + [
    ("grpc.enable_retries", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def install_uvloop() -> bool:
    """Use uvloop for the asyncio loops of this process when it is installed."""
    if os.environ.get("TANDEM_UVLOOP", "1") == "0":
        return False
    try:
        import uvloop
    except ImportError:
        logging.getLogger(__name__).info("uvloop not installed; using asyncio's default loop")
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main_coro_fn) -> None:
    """asyncio.run with uvloop when available."""
    install_uvloop()
    asyncio.run(main_coro_fn())


async def start_server(address: str, service, add_fn, servicer):
    """A grpc.aio server with one service, grpc.health.v1 (SERVING) and reflection.

    `service` is the proto service descriptor, `add_fn` its generated
    add_XServicer_to_server. Returns (server, health servicer)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_fn(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", service.full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer
