"""Prometheus metrics of a worker, served at /metrics on --metrics-port."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("tandem_worker_requests", "Requests a worker took, by RPC and outcome",
                   ["rpc", "outcome"])
TRANSFER_TOKENS = Counter("tandem_kv_transfer_tokens", "Positions whose KV moved between workers",
                          ["direction"])
TRANSFER_BYTES = Counter("tandem_kv_transfer_bytes", "KV bytes moved between workers", ["direction"])
TRANSFER_FAILURES = Counter("tandem_kv_transfer_failures", "KV transfers that failed or timed out")
PROMPT_TOKENS = Counter("tandem_prompt_tokens", "Prompt tokens of finished prefills, by source",
                        ["source"])       # computed | cached (own prefix cache) | transferred
GENERATED_TOKENS = Counter("tandem_generated_tokens", "Tokens generated")
TRANSFER_SECONDS = Histogram("tandem_kv_transfer_seconds", "Time from Prefill call to the last KV chunk",
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STEP_SECONDS = Histogram("tandem_engine_step_seconds", "Duration of one engine step (schedule, forward, sample)",
                         buckets=(0.002, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                                  0.075, 0.1, 0.25, 0.5, 1, 2.5))
RUNNING = Gauge("tandem_worker_running_requests", "Requests in the running batch")
WAITING = Gauge("tandem_worker_waiting_requests", "Requests queued for admission")
KV_USAGE = Gauge("tandem_worker_kv_usage", "Fraction of KV pages in use (prefix cache included)")


def bind_engine(load_fn) -> None:
    """Gauges read the engine's load at scrape time."""
    RUNNING.set_function(lambda: load_fn()[0])
    WAITING.set_function(lambda: load_fn()[1])
    KV_USAGE.set_function(lambda: load_fn()[2])
