"""Real Tandem processes on loopback for the integration tests.

Each process is `python -m services.cli ...` in its own process group, logs to a
file under the test's tmp dir, and is stopped by SIGTERM (then SIGKILL).
Workers get a small KV pool (the tests need little) and one thread each.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_ARGS = ["--max-total-tokens", "16384", "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.t_start = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                                  stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                  env={**os.environ, "TANDEM_NO_PROGRESS": "1", **(env or {})},
                                  start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return ""


def worker(name: str, role: str, log_dir: Path, extra: list[str] = ()) -> tuple[Proc, int, int]:
    port, mport = free_port(), free_port()
    p = Proc(name, ["worker", "--role", role, "--port", str(port), "--metrics-port", str(mport),
                    *WORKER_ARGS, *extra], log_dir)
    return p, port, mport


def gateway(name: str, worker_ports: list[int], log_dir: Path, policy: str = "cache_aware",
            extra: list[str] = ()) -> tuple[Proc, int, int]:
    port, gport = free_port(), free_port()
    args = ["gateway", "--port", str(port), "--grpc-port", str(gport), "--policy", policy, *extra]
    for wp in worker_ports:
        args += ["--worker", f"127.0.0.1:{wp}"]
    return Proc(name, args, log_dir), port, gport


def http(method: str, url: str, body=None, headers=None, timeout: float = 60) -> tuple[int, dict | str]:
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def wait_healthy(port: int, procs: list[Proc], timeout: float = 300) -> float:
    """Seconds until GET /health is 200; fails early if a process died."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited with {p.p.returncode}:\n{p.tail()}")
        try:
            if http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"not healthy after {timeout} s:\n" + "\n".join(p.tail(10) for p in procs))


def scrape(mport: int) -> dict[str, float]:
    """A real Prometheus scrape of one worker: {'name{labels}': value}."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
