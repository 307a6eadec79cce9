"""The benchmark tools: benchmarks/fake_worker.py (a fake tandem.v1.Worker) and
benchmarks/bench_serving.py (dataset builders, and its clients against tiny
in-test servers). A few seconds in all."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
from tandem.v1 import common_pb2, tandem_pb2, tandem_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = Path(os.path.expanduser("~/.cache/tandem/models/smollm2-135m-instruct"))


def _load_bench_serving():
    spec = importlib.util.spec_from_file_location(
        "bench_serving", ROOT / "benchmarks" / "bench_serving.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bs():
    return _load_bench_serving()


@pytest.fixture(scope="module")
def tok(bs):
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("no SmolLM2 tokenizer in ~/.cache/tandem/models")
    return bs.load_tokenizer(str(TOKENIZER))


# ------------------------------------------------------------ fake worker ---
@pytest.fixture(scope="module")
def fake_worker():
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("no SmolLM2 tokenizer in ~/.cache/tandem/models")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "fake_worker.py"), "--port", "0",
         "--role", "decode", "--tokenizer", str(TOKENIZER)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()   # "fake_worker listening on HOST:PORT ..."
        if "listening on" not in line:
            proc.kill()
            pytest.fail("fake_worker did not start: %r %s" % (line, proc.stderr.read()[-2000:]))
        yield line.split("listening on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_fake_worker_info_and_decode(fake_worker):
    async def go():
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(fake_worker, options=opts) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            info = await stub.Info(worker_pb2.InfoRequest(), timeout=5)
            sp = common_pb2.SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
            msgs = [m async for m in stub.Decode(
                worker_pb2.DecodeRequest(request_id="r1", prompt_ids=[1, 2, 3], sampling=sp,
                                         prefill_address="127.0.0.1:1"), timeout=5)]
            pre = [m async for m in stub.Prefill(worker_pb2.PrefillRequest(prompt_ids=[4, 5]),
                                                  timeout=5)]
            ab = await stub.Abort(worker_pb2.AbortRequest(request_id="r1"), timeout=5)
            call = stub.KvEvents(worker_pb2.KvEventsRequest())
            snap = await asyncio.wait_for(call.read(), 5)
            with pytest.raises(asyncio.TimeoutError):       # held open, silent
                await asyncio.wait_for(call.read(), 0.2)
            call.cancel()
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            hc = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            return info, msgs, pre, ab, snap, hc

    info, msgs, pre, ab, snap, hc = asyncio.run(go())
    assert info.role == "decode" and info.model == "fake-model" and info.ready
    assert info.context_length == 8192 and info.page_size == 16
    assert info.vocab_size == 49152 and list(info.eos_token_ids) == []
    assert list(info.transfer_backends) == ["grpc"] and info.worker_id
    assert json.loads(info.tokenizer_json)["model"]
    assert json.loads(info.tokenizer_config_json)["eos_token"]

    assert len(msgs) == 5 and all(len(m.token_ids) == 1 for m in msgs)
    assert all(not m.finish_reason for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.cached_tokens) == (3, 5, 0)

    assert len(pre) == 1 and pre[0].WhichOneof("kind") == "result"
    assert pre[0].result.cached_tokens == 0 and pre[0].result.sent_tokens == 0
    assert not ab.found
    assert snap.snapshot and snap.seq == 0 and snap.worker_id == info.worker_id
    assert hc.status == hc.SERVING


# --------------------------------------------------------------- datasets ---
def test_random_dataset_exact_lengths(bs, tok):
    reqs = bs.build_random(tok, num_prompts=12, input_len=100, output_len=7, seed=3)
    assert len(reqs) == 12
    for r in reqs:
        assert r.prompt_len == 100 and r.output_len == 7
        assert tok.encode(r.prompt, add_special_tokens=False).ids == r.prompt_ids
    assert len({r.prompt for r in reqs}) == 12
    again = bs.build_random(tok, num_prompts=12, input_len=100, output_len=7, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]       # seeded
    ranged = bs.build_random(tok, num_prompts=30, input_len=40, output_len=10,
                             range_ratio=0.5, seed=4)
    assert all(20 <= r.prompt_len <= 40 and 5 <= r.output_len <= 10 for r in ranged)


def test_shared_prefix_dataset(bs, tok):
    S, Q, G, P = 48, 16, 3, 4
    reqs = bs.build_shared_prefix(tok, num_groups=G, prompts_per_group=P, system_len=S,
                                  question_len=Q, output_len=5, seed=5)
    assert len(reqs) == G * P
    for r in reqs:
        assert r.prompt_len == S + Q and r.output_len == 5
        assert tok.encode(r.prompt, add_special_tokens=False).ids == r.prompt_ids
    prefixes = {}
    for r in reqs:
        prefixes.setdefault(r.group, set()).add(tuple(r.prompt_ids[:S]))
    assert sorted(prefixes) == list(range(G))
    assert all(len(p) == 1 for p in prefixes.values())            # a group shares S tokens
    assert len({next(iter(p)) for p in prefixes.values()}) == G    # groups differ
    assert len({tuple(r.prompt_ids[S:]) for r in reqs}) == G * P   # questions differ


def test_aggregate(bs):
    R = bs.Result
    res = [R(ok=True, prompt_len=10, output_len=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
           R(ok=True, prompt_len=10, output_len=3, ttft=0.3, latency=0.5, itl=[0.1, 0.1]),
           R(ok=False, error="x")]
    m = bs.aggregate(res, 2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_input_tokens"] == 20 and m["total_output_tokens"] == 8
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["concurrency"] == pytest.approx(0.5)


# ------------------------------------------------ clients vs tiny servers ---
def _args(bs, **kw):
    a = bs.parse_args(["--no-progress"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_grpc_client(bs):
    class Tandem(tandem_pb2_grpc.TandemServicer):
        async def Generate(self, request, context):
            n = request.sampling.max_new_tokens
            assert request.sampling.ignore_eos and request.sampling.temperature == 0
            for i in range(n):
                last = i == n - 1
                yield tandem_pb2.GenerateResponse(
                    token_ids=[7], text=" a", finish_reason="length" if last else "",
                    usage=common_pb2.Usage(prompt_tokens=len(request.token_ids.ids),
                                           completion_tokens=n) if last else None)

    async def go():
        server = grpc.aio.server()
        tandem_pb2_grpc.add_TandemServicer_to_server(Tandem(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            args = _args(bs, backend="tandem-grpc", grpc_target="127.0.0.1:%d" % port,
                         send_token_ids=True, max_concurrency=2, no_warmup=False)
            reqs = [bs.Request("x", [1, 2, 3], 3, 6) for _ in range(4)]
            return await bs.run_benchmark(args, reqs)
        finally:
            await server.stop(0)

    m = asyncio.run(go())
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["total_output_tokens"] == 24 and m["total_input_tokens"] == 12


def test_http_client_openai_sse(bs):
    pytest.importorskip("aiohttp")
    from aiohttp import web

    seen = []

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "m1", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        seen.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = [""] + [" w"] * body["max_tokens"]    # one empty chunk: not a token
        for c in chunks:
            await resp.write(b"data: " + json.dumps(
                {"choices": [{"index": 0, "text": c}]}).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps(
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens":
                                      body["max_tokens"]}}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def go():
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            args = _args(bs, backend="openai-completions",
                         base_url="http://127.0.0.1:%d" % port, max_concurrency=2)
            reqs = [bs.Request("hello", [1], 1, 4) for _ in range(3)]
            return await bs.run_benchmark(args, reqs)
        finally:
            await runner.cleanup()

    m = asyncio.run(go())
    assert m["model"] == "m1" and m["completed"] == 3 and m["total_output_tokens"] == 12
    body = seen[-1]
    assert body["model"] == "m1" and body["stream"] and body["ignore_eos"]
    assert body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}
    assert len(seen) == 4    # 1 warm-up + 3


@pytest.mark.parametrize("transport, api", [("auto", "tcp-decode-stream"), ("grpc", "grpc-decode-stream")])
def test_grpc_loadgen_against_the_fake_worker(fake_worker, transport, api):
    """benchmarks/grpc_loadgen.py: loadgen.py's JSON over the Worker protocol (the fake
    worker's framed TCP stream, or gRPC DecodeStream), every token counted."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpc_loadgen.py"), "--worker", fake_worker,
                          "-c", "4", "-r", "12", "-n", "5", "--warmup", "2", "--cpu", f"self={os.getpid()}",
                          "--tag", "target=direct-grpc", "--transport", transport],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert (d["ok"], d["errors"], d["chunks"], d["api"]) == (12, 0, 60, api)
    assert d["tags"] == {"target": "direct-grpc"} and set(d["cpu_s"]) == {"self"}
    assert 0 < d["ttfc_ms"]["p50"] <= d["total_ms"]["p50"] < 10_000


def test_gpu_idle_share_and_top_kernels():
    """benchmarks/roofline.gpu_idle_share over a profiler's events: the idle share of the steps'
    window (overlapping kernels counted once) and the kernels by GPU time."""
    import torch
    from types import SimpleNamespace as NS
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import roofline
    cuda = torch.autograd.DeviceType.CUDA

    def ev(name, start, end, device=None):
        return NS(name=name, time_range=NS(start=start, end=end), device_type=device)
    events = [ev("engine_step", 0, 50), ev("engine_step", 50, 100),
              ev("gemm", 10, 30, cuda), ev("gemm", 20, 40, cuda), ev("attn", 60, 70, cuda)]
    r = roofline.gpu_idle_share(NS(events=lambda: events))
    assert r["profiled_steps"] == 2 and r["gpu_busy_ms"] == 0.04 and abs(r["gpu_idle_share"] - 0.6) < 1e-9
    assert [(k["name"], k["calls"], k["share"]) for k in r["top_kernels"]] == [("gemm", 2, 0.8), ("attn", 1, 0.2)]
    by_kind = roofline.gpu_idle_share(NS(events=lambda: events), kinds=["mixed", "decode"])["step_kinds"]
    assert by_kind == {"mixed": {"steps": 1, "wall_ms": 0.05, "idle_ms": 0.02},
                       "decode": {"steps": 1, "wall_ms": 0.05, "idle_ms": 0.04}}
    assert roofline.merge_kinds([by_kind, by_kind])["decode"] == {"steps": 2, "wall_ms": 0.1, "idle_ms": 0.08}


def test_merge_idle_of_several_windows():
    """benchmarks/roofline.merge_idle: windows' wall and busy time summed (not their shares
    averaged), kernels merged by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import roofline
    a = {"profiled_steps": 2, "profiled_wall_ms": 10.0, "gpu_busy_ms": 9.0, "gpu_idle_share": 0.1,
         "top_kernels": [{"name": "gemm", "ms": 6.0, "calls": 4, "share": 0.6}, {"name": "attn", "ms": 3.0, "calls": 2}]}
    b = {"profiled_steps": 3, "profiled_wall_ms": 30.0, "gpu_busy_ms": 15.0, "gpu_idle_share": 0.5,
         "top_kernels": [{"name": "attn", "ms": 15.0, "calls": 3, "share": 1.0}]}
    r = roofline.merge_idle([a, b])
    assert r["profiled_steps"] == 5 and r["profiled_wall_ms"] == 40.0 and r["gpu_busy_ms"] == 24.0
    assert abs(r["gpu_idle_share"] - 0.4) < 1e-9 and r["window_idle_shares"] == [0.1, 0.5]
    assert [(k["name"], k["ms"], k["calls"]) for k in r["top_kernels"]] == [("attn", 18.0, 5), ("gemm", 6.0, 4)]
    assert roofline.merge_idle([]) == {}


def test_schedule_sim_runs_the_real_scheduler():
    """benchmarks/micro/schedule_sim.py on a tiny workload: every prompt token computed at
    least once, a priced step per scheduled batch, retractions when the pool is short."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "micro" / "schedule_sim.py"),
                          "--workload", "12,40,60", "--pool", "320", "--chunk", "64", "--max-running", "8"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), TANDEM_NO_PROGRESS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert d["prompt_tokens_computed"] >= 12 * 40 and d["total_s"] > 0
    assert d["kinds"]["decode"] + d["kinds"].get("mixed", 0) + d["kinds"].get("prefill", 0) == d["steps"]
    assert d["retractions"] > 0


def test_gemm_m_sweep_parses_row_counts():
    """benchmarks/micro/gemm_m_sweep.py --m: values and inclusive ranges; its default is
    the 53 row counts of the recorded H100 sweep (gpu_h100_gemm_m_sweep.json)."""
    spec = importlib.util.spec_from_file_location("gemm_m_sweep", ROOT / "benchmarks" / "micro" / "gemm_m_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_m("8:24:8,100,2048:2080:16") == [8, 16, 24, 100, 2048, 2064, 2080]
    recorded = json.loads((ROOT / "benchmarks" / "results" / "gpu_h100_gemm_m_sweep.json").read_text())
    assert mod.parse_m(mod.M_DEFAULT) == [r["m"] for r in recorded["rows"]]
