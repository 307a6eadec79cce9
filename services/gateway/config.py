"""The gateway's configuration (flags are generated from it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000                    # REST bridge (OpenAI, /generate, /health, /metrics)
    grpc_port: int = 50051              # the public Tandem gRPC service; 0: off
    worker: tuple[str, ...] = ()        # worker addresses (host:port), repeat the flag
    policy: str = "cache_aware"         # cache_aware | least_load | power_of_two | round_robin | random
    speculative_ttl_s: float = 2.0      # routed-but-unconfirmed pages count this long in the index
    max_inflight: int = 4096            # admission: more concurrent requests get 429
    max_retries: int = 2                # a worker that fails mid-request is replaced this many times
    api_key: tuple[str, ...] = ()       # accepted bearer keys; none: open
    decode_transport: str = "auto"      # auto: framed TCP where a worker offers it, else gRPC | grpc
