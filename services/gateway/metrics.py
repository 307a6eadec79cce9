"""Prometheus metrics of the gateway (served at /metrics on the REST port)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("tandem_gateway_requests", "Requests by API route and HTTP-style status",
                   ["route", "status"])
REJECTED = Counter("tandem_gateway_rejected", "Requests refused by admission control (429)")
RETRIES = Counter("tandem_gateway_retries", "Requests moved to another worker after a failure")
GENERATED = Counter("tandem_gateway_generated_tokens", "Tokens streamed back to callers")
INFLIGHT = Gauge("tandem_gateway_inflight_requests", "Requests in flight")
TTFT = Histogram("tandem_gateway_ttft_seconds", "Time to first token, at the gateway", buckets=_LAT)
E2E = Histogram("tandem_gateway_e2e_seconds", "Time from request to last token, at the gateway", buckets=_LAT)
