#!/usr/bin/env python3
"""Markdown summary of benchmarks/gateway_overhead.sh: medians over repetitions
of the peers' loadgen.py JSON lines (tagged target/setting/mode/rep).

    python benchmarks/summarize_gateway.py [benchmarks/results/gateway_overhead_raw.jsonl] \\
        [-o benchmarks/results/gateway_overhead.md]

"Added" = the target's median p50 minus the direct run's (same setting and
client connection mode). A second table takes the Tandem gateway against
direct-grpc (benchmarks/grpc_loadgen.py straight to a fake Tandem worker over
the Worker protocol, keep-alive only): what the gateway adds to its own
workers' path. CPU per token: the CPU time (utime+stime, all
threads) of the processes named gateway* (or w* for the workers) over the
measured phase, divided by the streamed chunks (one chunk = one token on
/generate).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections import defaultdict

ORDER = ["direct", "direct2", "direct-grpc", "relay", "tandem", "sglang"]
NAMES = {
    "direct": "direct, 1 fake SGLang worker (HTTP)",
    "direct2": "direct, 2 fake SGLang workers (client RR)",
    "direct-grpc": "direct, 1 fake Tandem worker (its decode stream, as the gateway uses it)",
    "relay": "relay_floor.py (uvicorn + framed TCP, no gateway work), 1 fake Tandem worker",
    "tandem": "tandem gateway round_robin, 2 fake Tandem workers",
    "sglang": "sglang-router 0.3.2 round_robin, 2 fake SGLang workers",
}
SETTINGS = {"c1": "C=1, R=200", "c256": "C=256, R=2000"}
MODES = {"keepalive": "keep-alive", "fresh": "new conn/request"}


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.*f" % (nd, v)
    return str(v)


def sfmt(v, nd=2):
    if v is None:
        return "-"
    return "%+.*f" % (nd, v)


def cpu_us_per_tok(run, prefix):
    per1k = run.get("cpu_s_per_1k_chunks") or {}
    vals = [v for k, v in per1k.items() if k.startswith(prefix) and v is not None]
    return sum(vals) * 1000.0 if vals else None     # CPU-s per 1k tokens -> us per token


def load(path):
    groups = defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            t = d.get("tags", {})
            groups[(t.get("setting"), t.get("mode"), t.get("target"))].append(d)
    return groups


def rows_of(groups):
    rows = {}
    for key, runs in groups.items():
        def m(fn):
            return med([fn(r) for r in runs])
        rows[key] = {
            "n": len(runs),
            "errors": sum(r.get("errors", 0) for r in runs),
            "rps": m(lambda r: r["req_per_s"]),
            "cps": m(lambda r: r["chunks_per_s"]),
            "ttfc50": m(lambda r: r["ttfc_ms"].get("p50")),
            "ttfc99": m(lambda r: r["ttfc_ms"].get("p99")),
            "tot50": m(lambda r: r["total_ms"].get("p50")),
            "tot99": m(lambda r: r["total_ms"].get("p99")),
            "gw_us": m(lambda r: cpu_us_per_tok(r, "gateway")),
            "w_us": m(lambda r: cpu_us_per_tok(r, "w")),
            "lg_us": m(lambda r: r["loadgen_cpu_s"] * 1e6 / r["chunks"] if r.get("chunks") else None),
            "busy": m(lambda r: r.get("machine_busy_frac")),
            "commit": sorted({r.get("tags", {}).get("commit", "") for r in runs} - {""}),
        }
    return rows


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def render(rows, raw_path):
    out = []
    p = out.append
    commits = sorted({c for r in rows.values() for c in r["commit"]})
    p("# Gateway overhead: Tandem gateway vs sglang-router vs direct")
    p("")
    p("Made by `benchmarks/gateway_overhead.sh` (loadgen.py of /work/shared/peers/sglang-router, "
      "`/generate` SSE, 64 tokens per request), summarized %s from `%s`. Machine: %s, %d cores "
      "(shared by the load generator, the workers and the gateway). Tandem commit(s): %s. "
      "Medians over the repetitions."
      % (datetime.date.today().isoformat(), os.path.basename(raw_path), cpu_model(),
         os.cpu_count() or 0, ", ".join(commits) or "-"))
    p("")
    p("| setting | client conn | path | runs | req/s | tokens/s | TTFC p50 / p99 ms "
      "| total p50 / p99 ms | added TTFC p50 ms | added total p50 ms "
      "| gateway CPU-us / tok | workers CPU-us / tok | loadgen CPU-us / tok | machine busy |")
    p("|" + "---|" * 14)
    settings = [s for s in SETTINGS if any(k[0] == s for k in rows)]
    settings += sorted({k[0] for k in rows if k[0] not in SETTINGS and k[0]})
    modes = [m for m in MODES if any(k[1] == m for k in rows)]
    targets = ORDER + sorted({k[2] for k in rows if k[2] not in ORDER and k[2]})
    for s in settings:
        for mode in modes:
            base = rows.get((s, mode, "direct"))
            for t in targets:
                r = rows.get((s, mode, t))
                if not r:
                    continue
                add_ttfc = add_tot = None
                if base and not t.startswith("direct") and None not in (
                        r["ttfc50"], base["ttfc50"], r["tot50"], base["tot50"]):
                    add_ttfc = r["ttfc50"] - base["ttfc50"]
                    add_tot = r["tot50"] - base["tot50"]
                err = "" if not r["errors"] else " (**%d errors**)" % r["errors"]
                p("| %s | %s | %s%s | %d | %s | %s | %s / %s | %s / %s | %s | %s | %s | %s | %s | %s |" % (
                    SETTINGS.get(s, s), MODES.get(mode, mode), NAMES.get(t, t), err, r["n"],
                    fmt(r["rps"], 1), fmt(r["cps"], 0), fmt(r["ttfc50"], 3), fmt(r["ttfc99"], 3),
                    fmt(r["tot50"], 3), fmt(r["tot99"], 3), sfmt(add_ttfc, 3), sfmt(add_tot, 3),
                    fmt(r["gw_us"], 2), fmt(r["w_us"], 2), fmt(r["lg_us"], 2),
                    fmt(r["busy"], 2)))
    p("")
    own = [(s, mode, rows[(s, "keepalive", "direct-grpc")], rows[(s, mode, "tandem")])
           for s in settings for mode in modes
           if (s, "keepalive", "direct-grpc") in rows and (s, mode, "tandem") in rows
           and None not in (rows[(s, "keepalive", "direct-grpc")]["ttfc50"], rows[(s, mode, "tandem")]["ttfc50"],
                            rows[(s, "keepalive", "direct-grpc")]["tot50"], rows[(s, mode, "tandem")]["tot50"])]
    if own:
        p("## The Tandem gateway against its own workers' path (direct-grpc, keep-alive)")
        p("")
        p("| setting | client conn | direct-grpc TTFC / total p50 ms | tandem TTFC / total p50 ms "
          "| added TTFC p50 ms | added total p50 ms |")
        p("|---|---|---|---|---|---|")
        for s, mode, b, r in own:
            p("| %s | %s | %s / %s | %s / %s | %s | %s |" % (
                SETTINGS.get(s, s), MODES.get(mode, mode), fmt(b["ttfc50"], 3), fmt(b["tot50"], 3),
                fmt(r["ttfc50"], 3), fmt(r["tot50"], 3), sfmt(r["ttfc50"] - b["ttfc50"], 3),
                sfmt(r["tot50"] - b["tot50"], 3)))
        p("")
    gw = [(mode, t, rows[("c256", mode, t)]) for mode in modes for t in targets
          if ("c256", mode, t) in rows and rows[("c256", mode, t)]["gw_us"] is not None]
    if gw:
        p("## Gateway CPU per streamed token at C=256")
        p("")
        p("| client conn | gateway | CPU-us / token | CPU-us / request (64 tok) | req/s |")
        p("|---|---|---|---|---|")
        for mode, t, r in gw:
            p("| %s | %s | %s | %s | %s |" % (MODES.get(mode, mode), NAMES.get(t, t),
                                            fmt(r["gw_us"], 2), fmt(r["gw_us"] * 64, 0),
                                            fmt(r["rps"], 1)))
        p("")
    p("For reference, /work/shared/peers/sglang-router/README.md measured sglang-router "
      "0.3.2 at about 5.0-5.5 CPU-us per token at C=256 and +0.3-0.6 ms added p50 at C=1 "
      "with new connections (+43.6 ms on keep-alive connections, from Nagle + delayed ACK). "
      "CPU figures come from /proc/PID/stat, which ticks every 10 ms: about +-8% at C=1, "
      "+-1.5% at C=256.")
    return "\n".join(out) + "\n"


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw", nargs="?",
                    default=os.path.join(here, "results", "gateway_overhead_raw.jsonl"))
    ap.add_argument("-o", "--output", default=None, help="also write the Markdown here")
    a = ap.parse_args(argv)
    md = render(rows_of(load(a.raw)), a.raw)
    sys.stdout.write(md)
    if a.output:
        with open(a.output, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
