"""`tandem serve`: a gateway and its workers as child processes on this machine.

Workers listen on consecutive ports from --worker-port (metrics on port +1000),
the gateway on --port (REST) and --grpc-port. The CPU cores are split between
the engines so their thread pools do not fight. Ctrl-C or SIGTERM stops every
child (SIGTERM, then SIGKILL after the drain timeout); a child that dies stops
the rest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

METRICS_PORT_OFFSET = 1000


@dataclass(frozen=True)
class ServeConfig:
    prefill: int = 1                   # prefill workers
    decode: int = 1                    # decode workers
    collocated: bool = False           # workers of role both (count: --decode), no prefill workers
    worker_port: int = 50061           # first worker port
    ready_timeout_s: float = 600.0     # first start converts the model and builds kernels


def plan_workers(cfg: ServeConfig) -> list[tuple[str, int]]:
    roles = ["both"] * max(1, cfg.decode) if cfg.collocated else ["prefill"] * cfg.prefill + ["decode"] * cfg.decode
    if not cfg.collocated and (cfg.prefill < 1 or cfg.decode < 1):
        raise ValueError("--prefill and --decode must each be >= 1 (or use --collocated)")
    return [(role, cfg.worker_port + i) for i, role in enumerate(roles)]


def threads_per_engine(n_engines: int) -> int:
    return max(1, (os.cpu_count() or 1) // n_engines)


def run(cfg: ServeConfig, gateway_argv: list[str], engine_argv: list[str], host: str, port: int,
        grpc_port: int, log_level: str) -> int:
    workers = plan_workers(cfg)
    threads = threads_per_engine(len(workers))
    cli = [sys.executable, "-m", "services.cli", "--log-level", log_level]
    procs: list[tuple[str, subprocess.Popen]] = []
    t0 = time.perf_counter()
    for role, wport in workers:
        cmd = cli + ["worker", "--role", role, "--host", host, "--port", str(wport),
                     "--metrics-port", str(wport + METRICS_PORT_OFFSET), "--threads", str(threads), *engine_argv]
        procs.append((f"{role} worker :{wport}", subprocess.Popen(cmd)))
    gcmd = cli + ["gateway", "--host", host, "--port", str(port), "--grpc-port", str(grpc_port),
                  *gateway_argv, *sum((["--worker", f"{host}:{p}"] for _, p in workers), [])]
    procs.append(("gateway", subprocess.Popen(gcmd)))

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"tandem serve: starting {len(workers)} workers "
          f"({', '.join(f'{r} :{p}' for r, p in workers)}, {threads} threads each) and the gateway",
          flush=True)
    ready = False
    url = f"http://{host}:{port}/health"
    while not stopping:
        dead = [(name, p.returncode) for name, p in procs if p.poll() is not None]
        if dead:
            print(f"tandem serve: {dead[0][0]} exited with code {dead[0][1]}; stopping", file=sys.stderr, flush=True)
            break
        if not ready:
            ready = _healthy(url)
            if ready:
                print(f"tandem serve: ready in {time.perf_counter() - t0:.1f} s\n"
                      f"  REST (OpenAI /v1/chat/completions, /v1/completions, /v1/models, /generate, /health, "
                      f"/metrics): http://{host}:{port}\n  gRPC (tandem.v1.Tandem): {host}:{grpc_port}\n"
                      f"  worker metrics: " + ", ".join(f"http://{host}:{p + METRICS_PORT_OFFSET}/metrics"
                                                       for _, p in workers), flush=True)
            elif time.perf_counter() - t0 > cfg.ready_timeout_s:
                print(f"tandem serve: not healthy after {cfg.ready_timeout_s:.0f} s; stopping", file=sys.stderr)
                break
        time.sleep(0.1)
    return _shutdown(procs, clean=stopping)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _shutdown(procs, clean: bool, timeout_s: float = 40.0) -> int:
    for _, p in procs[::-1]:                 # the gateway first: it stops taking requests
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for _, p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    print("tandem serve: stopped", flush=True)
    return 0 if clean else 1
