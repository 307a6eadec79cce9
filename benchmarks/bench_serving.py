#!/usr/bin/env python3
"""Online serving benchmark with the metrics of sglang.bench_serving.

Sends streaming requests to a running server and measures, per request, the
time to the first token (TTFT), the gaps between tokens (ITL), the end-to-end
latency and the number of output tokens; then aggregates them the way
sglang.bench_serving does (throughputs, mean / median / p99, TPOT, concurrency).

Backends (all streaming; temperature 0, ignore_eos):
  openai-completions  POST {base}/v1/completions       (SSE; stream_options.include_usage)
  openai-chat         POST {base}/v1/chat/completions  (SSE; stream_options.include_usage)
  sglang-generate     POST {base}/generate             (SGLang's native SSE)
  tandem-grpc         tandem.v1.Tandem/Generate at --grpc-target (server streaming)
Any OpenAI-compatible server works (Tandem's gateway, vLLM, SGLang, ...).

Datasets (prompts of random token ids from a seeded RNG, decoded to text with
the model's tokenizer and re-encoded, adjusted until they are exactly the
asked number of tokens):
  random                   --input-len N --output-len M --num-prompts K [--range-ratio r]
                           lengths are drawn uniformly from [int(N*r), N] (and
                           likewise for M), so r = 1 (default) gives exact lengths.
  generated-shared-prefix  --gsp-num-groups G --gsp-prompts-per-group P
                           --gsp-system-prompt-len S --gsp-question-len Q --gsp-output-len M
                           G*P prompts; those of a group share a system prompt of S
                           tokens, each followed by its own question of Q tokens.

Examples:
  python benchmarks/bench_serving.py --backend openai-completions \\
      --base-url http://127.0.0.1:8000 --dataset random --input-len 256 --output-len 64 \\
      --num-prompts 64 --max-concurrency 16 --output-file benchmarks/results/a.jsonl
  python benchmarks/bench_serving.py --backend tandem-grpc --grpc-target 127.0.0.1:50051 \\
      --dataset generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 16 \\
      --gsp-system-prompt-len 512 --gsp-question-len 64 --gsp-output-len 32 --max-concurrency 16

Text prompts are sent by default; --send-token-ids sends the ids instead where
the API takes them (completions `prompt`, /generate `input_ids`, gRPC token_ids).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field

try:
    import aiohttp
except ImportError:  # only the HTTP backends need it (pip install -e .[bench])
    aiohttp = None

DEFAULT_TOKENIZER = os.path.expanduser("~/.cache/tandem/models/smollm2-135m-instruct")
BACKENDS = ["openai-completions", "openai-chat", "sglang-generate", "tandem-grpc"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- datasets ---
@dataclass
class Request:
    prompt: str
    prompt_ids: list[int]
    prompt_len: int
    output_len: int
    group: int = -1          # generated-shared-prefix: the group's index


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    path = os.path.expanduser(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


def _normal_ids(tok) -> list[int]:
    """The ids a random prompt may use: the vocabulary less special/added tokens."""
    special = set(tok.get_added_tokens_decoder())
    return [i for i in range(tok.get_vocab_size(with_added_tokens=True)) if i not in special]


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def exact_len_prompt(tok, rng: random.Random, vocab: list[int], n: int,
                     max_tries: int = 20) -> tuple[str, list[int]]:
    """Random ids -> text -> ids, adjusted until the text re-encodes to exactly
    n tokens (cut when too long, random ids appended when too short). Returns
    (text, encode(text))."""
    ids = [rng.choice(vocab) for _ in range(n)]
    text, enc = "", []
    for _ in range(max_tries):
        text = tok.decode(ids, skip_special_tokens=False)
        enc = _encode(tok, text)
        if len(enc) == n:
            return text, enc
        if len(enc) > n:
            ids = enc[:n]
        else:
            ids = enc + [rng.choice(vocab) for _ in range(n - len(enc))]
    return text, enc  # close enough (rare): the real length is recorded


def _draw_len(rng: random.Random, n: int, ratio: float) -> int:
    lo = max(1, int(n * ratio)) if n > 0 else 0
    return rng.randint(min(lo, n), n)


def build_random(tok, num_prompts: int, input_len: int, output_len: int,
                 range_ratio: float = 1.0, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    vocab = _normal_ids(tok)
    out = []
    for _ in range(num_prompts):
        n = _draw_len(rng, input_len, range_ratio)
        m = _draw_len(rng, output_len, range_ratio)
        text, ids = exact_len_prompt(tok, rng, vocab, n)
        out.append(Request(text, ids, len(ids), m))
    return out


def build_shared_prefix(tok, num_groups: int, prompts_per_group: int, system_len: int,
                        question_len: int, output_len: int, seed: int = 0,
                        max_tries: int = 50) -> list[Request]:
    """Each group: one system prompt of system_len tokens; each of its prompts:
    that system prompt then a question of question_len tokens. Questions are
    redrawn until the whole prompt re-encodes to system ids + question_len
    more, so the prompts of a group share exactly their first system_len
    tokens. Prompts are interleaved across groups (g0, g1, ..., g0, g1, ...)."""
    rng = random.Random(seed)
    vocab = _normal_ids(tok)
    groups = []
    for g in range(num_groups):
        sys_text, sys_ids = exact_len_prompt(tok, rng, vocab, system_len)
        reqs = []
        for _ in range(prompts_per_group):
            for _ in range(max_tries):
                q_text, _ = exact_len_prompt(tok, rng, vocab, question_len)
                text = sys_text + q_text
                ids = _encode(tok, text)
                if len(ids) == system_len + question_len and ids[:system_len] == sys_ids:
                    break
            reqs.append(Request(text, ids, len(ids), output_len, g))
        groups.append(reqs)
    return [groups[g][i] for i in range(prompts_per_group) for g in range(num_groups)]


# ------------------------------------------------------------------ clients ---
@dataclass
class Result:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0             # from the server's usage when sent, else chunks/ids
    ttft: float = 0.0               # s, to the first chunk with a token
    latency: float = 0.0            # s, end to end
    itl: list[float] = field(default_factory=list)
    server_prompt_tokens: int | None = None
    error: str = ""


class Timer:
    """Per-request token timing. add(k) at each chunk carrying k (>= 1) new
    tokens: the gap since the previous chunk is split evenly over the k tokens,
    as sglang.bench_serving does for multi-token chunks."""

    def __init__(self, res: Result):
        self.res = res
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.tokens = 0

    def add(self, k: int = 1) -> None:
        now = time.perf_counter()
        if self.tokens == 0:
            self.res.ttft = now - self.t0
        else:
            gap = (now - self.last) / max(k, 1)
            self.res.itl.extend([gap] * max(k, 1))
        self.last = now
        self.tokens += max(k, 1)

    def done(self) -> None:
        self.res.latency = time.perf_counter() - self.t0


async def _sse_events(resp):
    """The JSON payloads of an SSE response, up to [DONE]."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        if data:
            yield json.loads(data)


class HttpClient:
    def __init__(self, args):
        if aiohttp is None:
            sys.exit("bench_serving: the HTTP backends need aiohttp (pip install -e '.[bench]')")
        self.args = args
        self.base = args.base_url.rstrip("/")
        limit = args.max_concurrency or 0
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0,
                                           force_close=args.fresh_conn),
            timeout=aiohttp.ClientTimeout(total=args.timeout),
            read_bufsize=10 * 2**20)
        self.headers = {"Content-Type": "application/json"}
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            self.headers["Authorization"] = "Bearer " + key

    async def default_model(self) -> str:
        if self.args.backend == "sglang-generate":
            return ""        # /generate takes no model: sent only when --model is given
        try:
            async with self.session.get(self.base + "/v1/models", headers=self.headers) as r:
                r.raise_for_status()
                data = (await r.json()).get("data") or []
                if data:
                    return data[0]["id"]
        except Exception as e:  # noqa: BLE001
            sys.exit("bench_serving: GET %s/v1/models failed (%s); pass --model"
                     % (self.base, e))
        sys.exit("bench_serving: GET %s/v1/models listed no model; pass --model" % self.base)

    def body(self, req: Request, model: str) -> tuple[str, dict]:
        a = self.args
        if a.backend == "sglang-generate":
            sp = {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True}
            body = {"sampling_params": sp, "stream": True}
            if a.send_token_ids:
                body["input_ids"] = req.prompt_ids
            else:
                body["text"] = req.prompt
            if model:
                body["model"] = model
            path = "/generate"
        else:
            body = {"model": model, "max_tokens": req.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if a.backend == "openai-chat":
                body["messages"] = [{"role": "user", "content": req.prompt}]
                path = "/v1/chat/completions"
            else:
                body["prompt"] = req.prompt_ids if a.send_token_ids else req.prompt
                path = "/v1/completions"
        if a.extra_request_body:
            extra = json.loads(a.extra_request_body)
            if a.backend == "sglang-generate" and "sampling_params" in extra:
                body["sampling_params"].update(extra.pop("sampling_params"))
            body.update(extra)
        return self.base + path, body

    async def send(self, req: Request, model: str) -> Result:
        res = Result(prompt_len=req.prompt_len)
        url, body = self.body(req, model)
        timer = Timer(res)
        usage_tokens = None
        try:
            async with self.session.post(url, json=body, headers=self.headers) as resp:
                if resp.status != 200:
                    res.error = "HTTP %d: %s" % (resp.status, (await resp.text())[:200])
                    timer.done()
                    return res
                if self.args.backend == "sglang-generate":
                    seen = 0
                    async for ev in _sse_events(resp):
                        meta = ev.get("meta_info") or {}
                        n = meta.get("completion_tokens")
                        if n is None:   # no count: one token per chunk with text
                            n = seen + (1 if ev.get("text") else 0)
                        if n > seen:
                            timer.add(n - seen)
                            seen = n
                        if "prompt_tokens" in meta:
                            res.server_prompt_tokens = meta["prompt_tokens"]
                    usage_tokens = seen
                else:
                    chat = self.args.backend == "openai-chat"
                    async for ev in _sse_events(resp):
                        if "error" in ev and not ev.get("choices"):
                            raise RuntimeError(json.dumps(ev["error"])[:200])
                        for ch in ev.get("choices") or ():
                            piece = ((ch.get("delta") or {}).get("content") if chat
                                     else ch.get("text"))
                            if piece:
                                timer.add(1)
                        usage = ev.get("usage")
                        if usage:
                            usage_tokens = usage.get("completion_tokens")
                            res.server_prompt_tokens = usage.get("prompt_tokens")
            timer.done()
        except Exception as e:  # noqa: BLE001
            timer.done()
            res.error = "%s: %s" % (type(e).__name__, e)
            return res
        return _finish(res, timer, usage_tokens)

    async def close(self):
        await self.session.close()


def _finish(res, timer, usage_tokens):
    """Output length from the server's usage when it sent one, else the streamed count."""
    res.output_len = usage_tokens if usage_tokens is not None else timer.tokens
    res.ok = timer.tokens > 0
    if not res.ok:
        res.error = "no tokens streamed"
    return res


class GrpcClient:
    def __init__(self, args):
        import grpc

        from tandem.v1 import common_pb2, tandem_pb2, tandem_pb2_grpc

        self.grpc, self.pb, self.common = grpc, tandem_pb2, common_pb2
        self.args = args
        self.channel = grpc.aio.insecure_channel(args.grpc_target, options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        self.stub = tandem_pb2_grpc.TandemStub(self.channel)

    async def default_model(self) -> str:
        return ""

    async def send(self, req: Request, model: str) -> Result:
        pb = self.pb
        res = Result(prompt_len=req.prompt_len)
        sp = self.common.SamplingParams(temperature=0.0, max_new_tokens=req.output_len,
                                        ignore_eos=True)
        if self.args.send_token_ids:
            gr = pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=req.prompt_ids),
                                    sampling=sp)
        else:
            gr = pb.GenerateRequest(model=model, text=req.prompt, sampling=sp)
        timer = Timer(res)
        usage_tokens = None
        try:
            async for msg in self.stub.Generate(gr, timeout=self.args.timeout):
                k = len(msg.token_ids)
                if k:
                    timer.add(k)
                if msg.HasField("usage"):
                    usage_tokens = msg.usage.completion_tokens
                    res.server_prompt_tokens = msg.usage.prompt_tokens
            timer.done()
        except self.grpc.aio.AioRpcError as e:
            timer.done()
            res.error = "gRPC %s: %s" % (e.code().name, (e.details() or "")[:200])
            return res
        except Exception as e:  # noqa: BLE001
            timer.done()
            res.error = "%s: %s" % (type(e).__name__, e)
            return res
        return _finish(res, timer, usage_tokens)

    async def close(self):
        await self.channel.close()


# ------------------------------------------------------------------ metrics ---
def percentile(vals: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not vals:
        return 0.0
    v = sorted(vals)
    k = (len(v) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _stats(prefix: str, vals_s: list[float], ps=(99,)) -> dict:
    v = [x * 1000.0 for x in vals_s]
    n = len(v)
    mean = sum(v) / n if n else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / n) if n else 0.0
    out = {"mean_%s_ms" % prefix: mean, "median_%s_ms" % prefix: percentile(v, 50),
           "std_%s_ms" % prefix: std}
    for p in ps:
        out["p%d_%s_ms" % (p, prefix)] = percentile(v, p)
    return out


def aggregate(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    inp = sum(r.prompt_len for r in ok)
    outp = sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itls = [x for r in ok for x in r.itl]
    m = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": inp, "total_output_tokens": outp,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "input_throughput": inp / duration if duration else 0.0,
        "output_throughput": outp / duration if duration else 0.0,
        "total_throughput": (inp + outp) / duration if duration else 0.0,
        "concurrency": sum(r.latency for r in ok) / duration if duration else 0.0,
    }
    m.update(_stats("e2e_latency", [r.latency for r in ok], (90, 99)))
    m.update(_stats("ttft", [r.ttft for r in ok], (99,)))
    m.update(_stats("tpot", tpots, (99,)))
    m.update(_stats("itl", itls, (95, 99)))
    m["max_itl_ms"] = max(itls) * 1000.0 if itls else 0.0
    return m


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a whole process (all its threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_info() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_model": cpu or platform.processor(), "cpu_count": os.cpu_count(),
            "hostname": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version()}


# -------------------------------------------------------------------- run ---
class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.failed = total, 0, 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, res: Result) -> None:
        self.done += 1
        self.failed += not res.ok
        if not self.enabled:
            return
        now = time.perf_counter()
        final = self.done == self.total
        if self.tty and (final or now - self.last >= 0.2):
            print("\r[bench] %d/%d done, %d failed, %.1f s " % (
                self.done, self.total, self.failed, now - self.t0),
                end="\n" if final else "", file=sys.stderr, flush=True)
            self.last = now
        elif not self.tty and (final or now - self.last >= 10.0):
            print("[bench] %d/%d done, %d failed, %.1f s" % (
                self.done, self.total, self.failed, now - self.t0), file=sys.stderr, flush=True)
            self.last = now


async def run_benchmark(args, requests: list[Request]) -> dict:
    client = GrpcClient(args) if args.backend == "tandem-grpc" else HttpClient(args)
    try:
        model = args.model if args.model is not None else await client.default_model()
        if not args.no_warmup and requests:
            w = await client.send(requests[0], model)
            if not w.ok:
                sys.exit("bench_serving: the warm-up request failed: %s" % w.error)
        pids = {}
        for spec in args.cpu:
            name, _, pid = spec.partition("=")
            pids[name] = int(pid)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        progress = Progress(len(requests), not args.no_progress)
        rng = random.Random(args.seed + 1)

        async def one(req: Request) -> Result:
            if sem is None:
                res = await client.send(req, model)
            else:
                async with sem:
                    res = await client.send(req, model)
            progress.update(res)
            return res

        cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
        own0 = time.process_time()
        t0 = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            tasks.append(asyncio.create_task(one(req)))
            if args.request_rate != math.inf and i + 1 < len(requests):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        own1 = time.process_time()
        cpu1 = {k: proc_cpu_s(p) for k, p in pids.items()}
    finally:
        await client.close()

    m = aggregate(results, duration)
    out_tokens = m["total_output_tokens"]
    m["cpu_s"] = {k: cpu1[k] - cpu0[k] for k in pids}
    m["cpu_us_per_output_token"] = {k: (cpu1[k] - cpu0[k]) * 1e6 / out_tokens
                                    if out_tokens else None for k in pids}
    m["bench_cpu_s"] = own1 - own0
    m["model"] = model
    errors = [r.error for r in results if not r.ok]
    m["errors"] = errors[:10]
    if args.output_details:
        m["details"] = [{"prompt_len": r.prompt_len, "output_len": r.output_len,
                         "ttft_ms": r.ttft * 1e3, "latency_ms": r.latency * 1e3,
                         "itl_ms": [x * 1e3 for x in r.itl], "error": r.error,
                         "server_prompt_tokens": r.server_prompt_tokens}
                        for r in results]
    return m


def print_table(a, m: dict) -> None:
    w = 50
    rows = [
        ("Backend:", a.backend),
        ("Traffic request rate:", a.request_rate),
        ("Max request concurrency:", a.max_concurrency or "not set"),
        ("Successful requests:", m["completed"]),
        ("Failed requests:", m["failed"]),
        ("Benchmark duration (s):", "%.2f" % m["duration"]),
        ("Total input tokens:", m["total_input_tokens"]),
        ("Total generated tokens:", m["total_output_tokens"]),
        ("Request throughput (req/s):", "%.2f" % m["request_throughput"]),
        ("Input token throughput (tok/s):", "%.2f" % m["input_throughput"]),
        ("Output token throughput (tok/s):", "%.2f" % m["output_throughput"]),
        ("Total token throughput (tok/s):", "%.2f" % m["total_throughput"]),
        ("Concurrency:", "%.2f" % m["concurrency"]),
    ]
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="))
    for k, v in rows:
        print("{:<40} {:<10}".format(k, v))

    def section(title, keys):
        print("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        for label, key in keys:
            print("{:<40} {:<10.2f}".format(label, m[key]))

    section("End-to-End Latency", [("Mean E2E Latency (ms):", "mean_e2e_latency_ms"),
                                   ("Median E2E Latency (ms):", "median_e2e_latency_ms"),
                                   ("P99 E2E Latency (ms):", "p99_e2e_latency_ms")])
    section("Time to First Token", [("Mean TTFT (ms):", "mean_ttft_ms"),
                                    ("Median TTFT (ms):", "median_ttft_ms"),
                                    ("P99 TTFT (ms):", "p99_ttft_ms")])
    section("Time per Output Token (excl. 1st token)",
            [("Mean TPOT (ms):", "mean_tpot_ms"), ("Median TPOT (ms):", "median_tpot_ms"),
             ("P99 TPOT (ms):", "p99_tpot_ms")])
    section("Inter-Token Latency", [("Mean ITL (ms):", "mean_itl_ms"),
                                    ("Median ITL (ms):", "median_itl_ms"),
                                    ("P95 ITL (ms):", "p95_itl_ms"),
                                    ("P99 ITL (ms):", "p99_itl_ms"),
                                    ("Max ITL (ms):", "max_itl_ms")])
    if m["cpu_s"]:
        print("{s:{c}^{n}}".format(s="CPU (utime+stime, measured run)", n=w, c="-"))
        for k, v in m["cpu_s"].items():
            per = m["cpu_us_per_output_token"][k]
            print("{:<40} {}".format("%s CPU s / us per out tok:" % k,
                                     "%.3f / %s" % (v, "-" if per is None else "%.1f" % per)))
    if m["errors"]:
        print("{s:{c}^{n}}".format(s="Errors (first)", n=w, c="-"))
        for e in m["errors"][:3]:
            print(e[:200])
    print("=" * w)


def write_output(path: str, record: dict) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    if path.endswith(".jsonl"):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    else:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


def build_requests(a, tok) -> list[Request]:
    if a.dataset == "random":
        return build_random(tok, a.num_prompts, a.input_len, a.output_len, a.range_ratio, a.seed)
    return build_shared_prefix(tok, a.gsp_num_groups, a.gsp_prompts_per_group,
                               a.gsp_system_prompt_len, a.gsp_question_len,
                               a.gsp_output_len, a.seed)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--backend", choices=BACKENDS, default="openai-completions")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--grpc-target", default="127.0.0.1:50051")
    ap.add_argument("--model", default=None,
                    help="default: the first of GET /v1/models (HTTP), '' (gRPC)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help="HF folder with tokenizer.json, or the file (default: %(default)s)")
    ap.add_argument("--dataset", choices=["random", "generated-shared-prefix"], default="random")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--range-ratio", type=float, default=1.0,
                    help="lengths uniform in [int(len*r), len]; 1: exact (default)")
    ap.add_argument("--gsp-num-groups", type=int, default=4)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=16)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=512)
    ap.add_argument("--gsp-question-len", type=int, default=64)
    ap.add_argument("--gsp-output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--send-token-ids", action="store_true",
                    help="send token ids, not text (completions, /generate, gRPC)")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests/s, Poisson arrivals (default inf: all at once)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up request")
    ap.add_argument("--fresh-conn", action="store_true",
                    help="HTTP: a new connection per request (default: keep-alive)")
    ap.add_argument("--timeout", type=float, default=6 * 3600.0, help="per request, s")
    ap.add_argument("--extra-request-body", default=None,
                    help="JSON merged into every HTTP request body")
    ap.add_argument("--cpu", action="append", default=[], metavar="NAME=PID",
                    help="report this process's CPU time over the run (repeatable)")
    ap.add_argument("--output-file", default=None,
                    help="write the JSON result (.jsonl: append one line)")
    ap.add_argument("--output-details", action="store_true",
                    help="add per-request figures to the JSON")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="copied into the JSON's tags (repeatable)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.send_token_ids and a.backend == "openai-chat":
        ap.error("--send-token-ids: chat messages are text")
    if a.request_rate <= 0:
        ap.error("--request-rate must be > 0")
    for spec in a.cpu:
        name, _, pid = spec.partition("=")
        if not name or not pid.isdigit():
            ap.error("--cpu wants NAME=PID, got %r" % spec)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    tok = load_tokenizer(a.tokenizer)
    t = time.perf_counter()
    requests = build_requests(a, tok)
    if not a.no_progress:
        print("[bench] %d prompts built in %.2f s (%s, seed %d)"
              % (len(requests), time.perf_counter() - t, a.dataset, a.seed), file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    coro = run_benchmark(a, requests)
    m = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    record = {
        "backend": a.backend, "dataset_name": a.dataset,
        "base_url": a.grpc_target if a.backend == "tandem-grpc" else a.base_url,
        "request_rate": a.request_rate if a.request_rate != math.inf else "inf",
        "max_concurrency": a.max_concurrency, "seed": a.seed,
        "send_token_ids": a.send_token_ids, "fresh_conn": a.fresh_conn,
        "num_prompts": len(requests),
        "dataset_params": ({"input_len": a.input_len, "output_len": a.output_len,
                            "range_ratio": a.range_ratio} if a.dataset == "random" else
                           {"num_groups": a.gsp_num_groups,
                            "prompts_per_group": a.gsp_prompts_per_group,
                            "system_prompt_len": a.gsp_system_prompt_len,
                            "question_len": a.gsp_question_len,
                            "output_len": a.gsp_output_len}),
        "tags": dict(t.split("=", 1) for t in a.tag if "=" in t),
        **m,
        "command": shlex.join([sys.executable] + sys.argv) if argv is None
        else shlex.join([sys.executable, sys.argv[0]] + list(argv)),
        "date": date, "machine": machine_info(),
    }
    if a.output_file:
        write_output(a.output_file, record)
    print_table(a, m)
    return 0 if m["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
