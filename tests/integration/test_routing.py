"""Cache-aware routing over 2 prefill workers and 1 decode worker (real
processes): each group of requests sharing a long prefix lands on the prefill
worker that cached it, and usage.cached_tokens shows it; round_robin does not.
A restarted gateway rebuilds the same index from the workers' snapshots."""
from __future__ import annotations

import random
import time

import pytest

from tests.integration import cluster

PREFIX, TAIL = 320, 12
OK = 'tandem_worker_requests_total{outcome="ok",rpc="prefill"}'


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    logs = tmp_path_factory.mktemp("routing")
    p1, p1port, p1met = cluster.worker("prefill1", "prefill", logs)
    p2, p2port, p2met = cluster.worker("prefill2", "prefill", logs)
    d, dport, _ = cluster.worker("decode", "decode", logs)
    ports = [p1port, p2port, dport]
    ca, ca_port, _ = cluster.gateway("gw_cache_aware", ports, logs, "cache_aware")
    rr, rr_port, _ = cluster.gateway("gw_round_robin", ports, logs, "round_robin")
    procs = [p1, p2, d, ca, rr]
    try:
        cluster.wait_healthy(ca_port, procs)
        cluster.wait_healthy(rr_port, procs)
        yield {"ca": ca, "ca_port": ca_port, "rr_port": rr_port, "worker_ports": ports, "logs": logs,
               "metrics": {f"127.0.0.1:{p1port}": p1met, f"127.0.0.1:{p2port}": p2met}, "procs": procs}
    finally:
        for p in procs[::-1]:
            p.stop()


def _counts(topo) -> dict[str, float]:
    return {addr: cluster.scrape(m).get(OK, 0.0) for addr, m in topo["metrics"].items()}


def _run_groups(topo, port: int, seed: int) -> tuple[dict, dict]:
    """Requests of two groups in the order A A B B A A B B ...: (group -> workers used, group -> cached)."""
    rng = random.Random(seed)
    prefixes = {g: [rng.randrange(1000, 40000) for _ in range(PREFIX)] for g in "AB"}
    landed, cached = {"A": [], "B": []}, {"A": [], "B": []}
    for i in range(20):
        g = "AB"[(i // 2) % 2]
        prompt = prefixes[g] + [rng.randrange(1000, 40000) for _ in range(TAIL)]
        before = _counts(topo)
        status, body = cluster.http("POST", f"http://127.0.0.1:{port}/v1/completions",
                                    {"prompt": prompt, "max_tokens": 1, "temperature": 0})
        assert status == 200, body
        after = _counts(topo)
        (worker,) = [a for a in after if after[a] > before[a]]
        landed[g].append(worker)
        cached[g].append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    return landed, cached


def _share_on_first(landed: list[str]) -> float:
    return sum(w == landed[0] for w in landed[1:]) / (len(landed) - 1)


def test_cache_aware_sends_each_group_to_its_worker(topo):
    landed, cached = _run_groups(topo, topo["ca_port"], seed=1)
    for g in "AB":
        assert _share_on_first(landed[g]) >= 0.95, landed[g]
        assert cached[g][0] < PREFIX // 2
        assert all(c >= PREFIX // 16 * 16 for c in cached[g][1:]), cached[g]


def test_round_robin_does_not(topo):
    landed, _ = _run_groups(topo, topo["rr_port"], seed=2)
    for g in "AB":
        assert _share_on_first(landed[g]) < 0.95, landed[g]


def test_restarted_gateway_rebuilds_the_same_index(topo):
    url = f"http://127.0.0.1:{topo['ca_port']}/debug/index"
    status, before = cluster.http("GET", url)
    assert status == 200 and sum(v["pages"] for v in before.values()) > 0, before
    topo["ca"].stop()
    # The same REST port as before: clients see the same gateway come back.
    args = ["gateway", "--port", str(topo["ca_port"]), "--grpc-port", str(cluster.free_port()),
            "--policy", "cache_aware"] + sum((["--worker", f"127.0.0.1:{p}"] for p in topo["worker_ports"]), [])
    new = cluster.Proc("gw_restarted", args, topo["logs"])
    topo["procs"].append(new)
    t_up = None
    while time.monotonic() - new.t_start < 60:
        try:
            status, now = cluster.http("GET", url, timeout=1)
        except OSError:
            time.sleep(0.02)
            continue
        t_up = t_up or time.monotonic()
        if now == before:
            break
        time.sleep(0.02)
    t_same = time.monotonic()
    assert now == before
    rebuild = t_same - t_up
    print(f"gateway restart: serving after {t_up - new.t_start:.2f} s, same index {rebuild:.2f} s later")
    assert rebuild <= 2.0
