"""Nothing lost (real processes, 2 collocated workers): a worker killed mid-stream
is replaced and the caller's stream goes on to the same greedy text; SIGTERM
drains a worker: its in-flight request finishes, it exits cleanly, new
requests go to the other worker."""
from __future__ import annotations

import json
import random
import signal
import threading
import time
import urllib.request

import pytest

from tests.integration import cluster

N = 160
RUNNING = "tandem_worker_running_requests"


@pytest.fixture()
def pair(tmp_path):
    # float32: a resumed request recomputes the generated tokens' KV by prefill, and
    # fp32 keeps that from tipping a near-tie the other way.
    w1, port1, m1 = cluster.worker("w1", "both", tmp_path, ["--dtype", "float32"])
    w2, port2, m2 = cluster.worker("w2", "both", tmp_path, ["--dtype", "float32"])
    gw, port, _ = cluster.gateway("gw", [port1, port2], tmp_path, "least_load")
    procs = [w1, w2, gw]
    try:
        cluster.wait_healthy(port, procs)
        while not all(w["healthy"] for w in cluster.http("GET", f"http://127.0.0.1:{port}/health")[1]["workers"].values()):
            time.sleep(0.1)                            # both workers, not just the first one up
        yield {"base": f"http://127.0.0.1:{port}", "workers": {m1: w1, m2: w2}}
    finally:
        for p in procs[::-1]:
            p.stop()


def _body(prompt):
    return {"prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


class Stream(threading.Thread):
    """Reads one SSE completion in the background, chunk by chunk."""

    def __init__(self, base, prompt):
        super().__init__(daemon=True)
        self.req = urllib.request.Request(base + "/v1/completions", data=json.dumps(_body(prompt)).encode(),
                                          headers={"Content-Type": "application/json"})
        self.texts, self.usage, self.error, self.finish = [], None, None, None

    def run(self):
        with urllib.request.urlopen(self.req, timeout=300) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    self.error = ev["error"]
                if ev.get("choices"):
                    self.texts.append(ev["choices"][0]["text"])
                    self.finish = ev["choices"][0]["finish_reason"] or self.finish
                if ev.get("usage"):
                    self.usage = ev["usage"]


def _serving(pair) -> tuple[int, cluster.Proc]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for mport, proc in pair["workers"].items():
            if proc.alive() and cluster.scrape(mport).get(RUNNING, 0) >= 1:
                return mport, proc
        time.sleep(0.02)
    raise TimeoutError("no worker picked up the request")


def _reference(base, prompt) -> str:
    s = Stream(base, prompt)
    s.run()
    assert s.error is None and s.usage["completion_tokens"] == N
    return "".join(s.texts)


def _wait_chunks(s: Stream, n: int) -> None:
    deadline = time.monotonic() + 120
    while len(s.texts) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_killed_worker_mid_stream_is_replaced(pair):
    prompt = [random.Random(3).randrange(1000, 40000) for _ in range(40)]
    want = _reference(pair["base"], prompt)
    s = Stream(pair["base"], prompt)
    s.start()
    mport, victim = _serving(pair)
    _wait_chunks(s, 20)
    victim.p.send_signal(signal.SIGKILL)
    s.join(300)
    assert s.error is None, s.error
    assert s.usage["completion_tokens"] == N and s.finish == "length"
    assert "".join(s.texts) == want


def test_sigterm_drains_in_flight_then_exits(pair):
    prompt = [random.Random(4).randrange(1000, 40000) for _ in range(40)]
    s = Stream(pair["base"], prompt)
    s.start()
    mport, victim = _serving(pair)
    _wait_chunks(s, 10)
    victim.p.send_signal(signal.SIGTERM)
    s.join(300)
    assert s.error is None and s.usage["completion_tokens"] == N     # finished on the draining worker
    assert victim.p.wait(60) == 0
    status, body = cluster.http("POST", pair["base"] + "/v1/completions",
                                {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
