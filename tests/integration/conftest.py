"""One disaggregated topology (gateway + 1 prefill + 1 decode worker) per session,
shared by the tests that only need a working system."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration import cluster


@pytest.fixture(scope="session")
def disagg(tmp_path_factory):
    logs = tmp_path_factory.mktemp("disagg")
    pw, pport, pmet = cluster.worker("prefill", "prefill", logs)
    dw, dport, dmet = cluster.worker("decode", "decode", logs)
    gw, port, gport = cluster.gateway("gateway", [pport, dport], logs)
    procs = [pw, dw, gw]
    try:
        cluster.wait_healthy(port, procs)
        yield {"port": port, "grpc_port": gport, "prefill_metrics": pmet, "decode_metrics": dmet,
               "prefill_port": pport, "decode_port": dport,
               "procs": procs, "base": f"http://127.0.0.1:{port}"}
    finally:
        for p in procs[::-1]:
            p.stop()


_OFFLINE = """
import json, sys
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.sampling_params import SamplingParams
prompts, n, chat = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
engine = Engine(EngineConfig())
for p in prompts:       # one at a time: a batch of one, as each request runs on the server here
    r = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=n), chat=chat)[0]
    print(json.dumps({"text": r.text, "output_ids": r.output_ids, "prompt_ids": r.prompt_ids}))
"""


def offline_ids(prompts: list[str], max_new_tokens: int, chat: bool = False) -> list[dict]:
    """The engine's own greedy output, offline, with one thread like the workers."""
    out = subprocess.run([sys.executable, "-c", _OFFLINE, json.dumps(prompts), str(max_new_tokens),
                          "1" if chat else "0"], cwd=cluster.ROOT, capture_output=True, text=True, check=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "TANDEM_NO_PROGRESS": "1"})
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
