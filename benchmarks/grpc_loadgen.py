#!/usr/bin/env python3
"""The peers' loadgen.py, over the Worker gRPC service instead of HTTP.

A client straight to (fake) Tandem workers, speaking to them as a gateway does:
one decode stream per worker (services/gateway/decode_mux.py: framed TCP where
the worker offers it, else Worker.DecodeStream; --transport grpc forces gRPC), C
requests in flight until R are done, after a warm-up that is not counted.
Per request: TTFC (its first DecodeUpdate) and total time. It prints one
JSON line of the same shape as loadgen.py's, so summarize_gateway.py reads
both: it is the "direct" baseline of the Tandem gateway, the path a request
takes without it (no HTTP, no tokenizer, no routing).

    python benchmarks/grpc_loadgen.py --worker 127.0.0.1:18461 -c 1 -r 200 -n 64 --cpu w1=PID
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from services.common.grpc_utils import CHANNEL_OPTIONS, install_uvloop  # noqa: E402
from services.gateway.decode_mux import DecodeMux  # noqa: E402
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, all threads (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[int, int]:
    """(all ticks, idle + iowait ticks) of the machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]), v[3] + v[4]


def summary_ms(seconds: list[float]) -> dict:
    """p50/p90/p99 (linear between ranks, as loadgen.py), mean, min, max, in ms."""
    v = sorted(x * 1e3 for x in seconds)
    if not v:
        return {}

    def pct(p):
        k = (len(v) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)
    return {"p50": round(pct(50), 3), "p90": round(pct(90), 3), "p99": round(pct(99), 3),
            "mean": round(sum(v) / len(v), 3), "min": round(v[0], 3), "max": round(v[-1], 3)}


async def one_request(mux: DecodeMux, i: int, n: int, prompt_len: int):
    t0 = time.perf_counter()
    rid, q = mux.open(worker_pb2.DecodeRequest(
        request_id=f"r{i}", prompt_ids=list(range(100, 100 + prompt_len)),
        sampling=common_pb2.SamplingParams(max_new_tokens=n, temperature=0.0)))
    ttfc, tokens = None, 0
    try:
        while True:
            for u in await q.take():
                if isinstance(u, Exception):
                    return ttfc, time.perf_counter() - t0, tokens, str(u)
                if ttfc is None:
                    ttfc = time.perf_counter() - t0
                tokens += len(u.token_ids)
                if u.error_code:
                    return ttfc, time.perf_counter() - t0, tokens, u.error_message
                if u.finish_reason:
                    return ttfc, time.perf_counter() - t0, tokens, None
    finally:
        mux.cancel(rid)


async def run_phase(muxes, c, r, n, prompt_len, start, results):
    it = iter(range(r))

    async def worker():
        for i in it:
            results.append(await one_request(muxes[i % len(muxes)], start + i, n, prompt_len))

    await asyncio.gather(*(worker() for _ in range(min(c, r))))


async def main_async(a) -> dict:
    pids = {name: int(pid) for name, pid in (s.split("=", 1) for s in a.cpu)}
    channels = [grpc.aio.insecure_channel(w, options=CHANNEL_OPTIONS) for w in a.worker]
    muxes = [DecodeMux(worker_pb2_grpc.WorkerStub(ch), w) for ch, w in zip(channels, a.worker)]
    if a.transport == "auto":                 # as the gateway does: the framed stream when offered
        for m in muxes:
            info = await m.stub.Info(worker_pb2.InfoRequest(), timeout=5)
            port = info.decode_stream_port
            m.tcp = (m.address.rsplit(":", 1)[0], port, info.worker_id) if port else None
    warmup = a.warmup if a.warmup is not None else max(a.concurrency, 8)
    try:
        if warmup:
            await run_phase(muxes, a.concurrency, warmup, a.max_new_tokens, a.prompt_tokens, 10_000_000, [])
        cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
        m0, own0 = machine_cpu(), time.process_time()
        res: list = []
        t0 = time.perf_counter()
        await run_phase(muxes, a.concurrency, a.requests, a.max_new_tokens, a.prompt_tokens, 0, res)
        dur = time.perf_counter() - t0
        own1, m1 = time.process_time(), machine_cpu()
        cpu1 = {k: proc_cpu_s(p) for k, p in pids.items()}
    finally:
        for m in muxes:
            await m.close()
        for ch in channels:
            await ch.close()
    ok = [x for x in res if x[3] is None and x[2] >= a.max_new_tokens]
    errs = [x[3] or f"short stream: {x[2]} tokens" for x in res if not (x[3] is None and x[2] >= a.max_new_tokens)]
    chunks = sum(x[2] for x in res)
    ticks = m1[0] - m0[0]
    return {
        "label": a.label, "tags": dict(t.split("=", 1) for t in a.tag), "url": a.worker,
        "api": "tcp-decode-stream" if all(m.tcp for m in muxes) else "grpc-decode-stream",
        "keepalive": True, "concurrency": a.concurrency, "requests": a.requests,
        "max_new_tokens": a.max_new_tokens, "prompt_tokens": a.prompt_tokens, "warmup": warmup,
        "ok": len(ok), "errors": len(errs), "error_samples": errs[:3], "duration_s": round(dur, 4),
        "req_per_s": round(len(res) / dur, 2), "chunks": chunks, "chunks_per_s": round(chunks / dur, 1),
        "ttfc_ms": summary_ms([x[0] for x in res if x[0] is not None]),
        "total_ms": summary_ms([x[1] for x in res]),
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 3) for k in pids},
        "cpu_s_per_1k_chunks": {k: round((cpu1[k] - cpu0[k]) * 1000.0 / chunks, 5) if chunks else None
                                for k in pids},
        "loadgen_cpu_s": round(own1 - own0, 3),
        "machine_busy_frac": round(1.0 - (m1[1] - m0[1]) / ticks, 3) if ticks else None,
        "machine_cpus": os.cpu_count(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="append", required=True, help="HOST:PORT of a worker (repeatable)")
    ap.add_argument("-c", "--concurrency", type=int, default=1)
    ap.add_argument("-r", "--requests", type=int, default=200)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=36, help="loadgen.py's 32-word prompt is ~36 tokens")
    ap.add_argument("--warmup", type=int, default=None, help="default: max(C, 8)")
    ap.add_argument("--cpu", action="append", default=[], metavar="NAME=PID")
    ap.add_argument("--transport", choices=["auto", "grpc"], default="auto",
                    help="auto: the worker's framed TCP stream when it offers one (as the gateway)")
    ap.add_argument("--label", default="")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    install_uvloop()
    print(json.dumps(asyncio.run(main_async(a))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
