"""kernels/triton on one GPU: HBM bandwidth, then each kernel against its torch reference.

- HBM bandwidth, measured two ways: a read-only reduction (a small Triton kernel
  that sums a 4 GiB buffer; bytes = bytes read) and a device-to-device copy
  (bytes = read + written). The read figure is the denominator of "% of HBM".
- decode_attention at batch 64 x context 4096, Llama-3.1-8B heads (32 q, 8 kv,
  D 128), bf16, page 16 and 64, over a few launch configs (splits, BLOCK_N,
  warps, stages): bytes of KV read, GB/s, % of the measured read bandwidth
  (issue 4's target: >= 80%), and the torch reference's time.
- extend_attention (prefill), fused_add_rmsnorm, apply_rope_, store_kv vs references.

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs).
usage: python3 benchmarks/micro/gpu_kernels.py [--output results.json] [--quick]
(default output: $OUT/gpu_kernels.json when $OUT is set)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from kernels import triton as tk  # noqa: E402
from kernels.triton import reference as ref  # noqa: E402
from kernels.triton.decode import default_num_splits  # noqa: E402

DEV = torch.device("cuda")
H, KVH, D = 32, 8, 128           # Llama-3.1-8B


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@triton.jit
def _read_kernel(X, PARTIAL, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK * ITERS + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(ITERS):
        acc += tl.load(X + offs + i * BLOCK, mask=offs + i * BLOCK < n, other=0.0).to(tl.float32)
    tl.store(PARTIAL + pid, tl.sum(acc, 0))


def hbm_bandwidth() -> dict:
    n = 2 ** 31                                       # 4 GiB of bf16
    x = torch.ones(n, dtype=torch.bfloat16, device=DEV)
    block, iters = 4096, 16
    partial = torch.empty(triton.cdiv(n, block * iters), dtype=torch.float32, device=DEV)
    read_ms = bench_ms(lambda: _read_kernel[(partial.numel(),)](x, partial, n, BLOCK=block, ITERS=iters,
                                                                num_warps=8))
    assert partial.sum().item() == n                  # it really read everything
    y = torch.empty_like(x)
    copy_ms = bench_ms(lambda: y.copy_(x))
    nbytes = x.numel() * x.element_size()
    return {"read_GBps": nbytes / read_ms / 1e6, "copy_GBps": 2 * nbytes / copy_ms / 1e6,
            "read_method": "Triton sum of a 4 GiB bf16 buffer (bytes read)",
            "copy_method": "torch copy_ of 4 GiB, device to device (bytes read + written)"}


def paged(lens, page_size, dtype=torch.bfloat16, gen=None):
    need = [triton.cdiv(n, page_size) for n in lens]
    pages = torch.randperm(sum(need), generator=gen) + 1          # fragmented, like a busy pool
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    at = 0
    for b, c in enumerate(need):
        table[b, :c] = pages[at:at + c].int()
        at += c
    slots = (sum(need) + 1) * page_size
    k = torch.randn(slots, KVH, D, device=DEV, dtype=dtype)
    v = torch.randn(slots, KVH, D, device=DEV, dtype=dtype)
    return k, v, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


DECODE_CONFIGS = [  # (num_splits, block_n, num_warps, num_stages); None = the wrapper's default
    (None, None, None, None), (1, 64, 4, 2), (2, 64, 4, 2), (4, 64, 4, 2), (8, 64, 4, 2),
    (None, 32, 4, 2), (None, 64, 4, 3), (None, 64, 8, 2), (None, 128, 8, 2), (None, 32, 2, 3),
    (4, 32, 4, 3), (8, 32, 4, 3),
]


def time_decode(q, k, v, table, seq_lens, page_size, want, kw) -> tuple[float, float]:
    """(ms, max abs difference from `want`) of decode_attention under launch config kw."""
    got = tk.decode_attention(q, k, v, table, seq_lens, page_size, D ** -0.5, **kw)
    err = (got.float() - want.float()).abs().max().item()
    return bench_ms(lambda: tk.decode_attention(q, k, v, table, seq_lens, page_size, D ** -0.5, **kw)), err


def bench_decode(bw: dict, quick: bool) -> list[dict]:
    batch, ctx = 64, 4096
    rows = []
    for page_size in (16, 64):
        k, v, table, seq_lens = paged([ctx] * batch, page_size, gen=torch.Generator().manual_seed(0))
        q = torch.randn(batch, H, D, device=DEV, dtype=torch.bfloat16)
        kv_bytes = int(seq_lens.sum()) * KVH * D * 2 * k.element_size()
        want = ref.decode_attention(q, k, v, table, seq_lens, page_size, D ** -0.5)
        ref_ms = bench_ms(lambda: ref.decode_attention(q, k, v, table, seq_lens, page_size, D ** -0.5))
        default = default_num_splits(batch, KVH, table.shape[1], page_size, DEV)
        for splits, bn, warps, stages in DECODE_CONFIGS[:3] if quick else DECODE_CONFIGS:
            kw = dict(num_splits=splits, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                ms, err = time_decode(q, k, v, table, seq_lens, page_size, want, kw)
            except Exception as e:                        # e.g. out of shared memory for a config
                rows.append({"page_size": page_size, "config": kw, "error": repr(e)[:200]})
                print(f"page {page_size:3d} {kw}: failed {e!r:.120}")
                continue
            gbps = kv_bytes / ms / 1e6
            row = {"page_size": page_size, "batch": batch, "context": ctx, "config": kw,
                   "default_num_splits": default, "kv_bytes": kv_bytes, "ms": ms, "GBps": gbps,
                   "pct_of_read_bw": 100 * gbps / bw["read_GBps"], "max_abs_err": err,
                   "reference_ms": ref_ms}
            rows.append(row)
            print(f"decode page {page_size:3d} splits {splits or default:>2} block_n {bn or 'def':>3} "
                  f"warps {warps or 'def':>3} stages {stages or 'def':>3}: {ms * 1e3:8.1f} us "
                  f"{gbps:7.0f} GB/s {row['pct_of_read_bw']:5.1f}% of read BW  err {err:.3g}  "
                  f"(torch ref {ref_ms:.2f} ms)")
    return rows


SERVING_CONFIGS = [(splits, bn, w, st) for splits in (1, 2) for bn in (32, 64, 128) for w in (4, 8)
                   for st in (2, 3, 4)]


def bench_decode_serving(bw: dict) -> list[dict]:
    """The throughput run's decode steps: batch 512, contexts spread over 1024-2047 (half-way
    through their 1,024 output tokens), page 16, over a grid of launch configs."""
    batch, page_size = 512, 16
    gen = torch.Generator().manual_seed(0)
    lens = (1024 + torch.randint(0, 1024, (batch,), generator=gen)).tolist()
    k, v, table, seq_lens = paged(lens, page_size, gen=gen)
    q = torch.randn(batch, H, D, device=DEV, dtype=torch.bfloat16)
    kv_bytes = int(seq_lens.sum()) * KVH * D * 2 * k.element_size()
    want = tk.decode_attention(q, k, v, table, seq_lens, page_size, D ** -0.5)
    rows = []
    for splits, bn, warps, stages in SERVING_CONFIGS:
        kw = dict(num_splits=splits, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            ms, err = time_decode(q, k, v, table, seq_lens, page_size, want, kw)
        except Exception as e:                        # e.g. out of shared memory for a config
            print(f"serving {kw}: failed {e!r:.120}")
            continue
        gbps = kv_bytes / ms / 1e6
        rows.append({"batch": batch, "contexts": "1024-2047", "page_size": page_size, "config": kw, "ms": ms,
                     "GBps": gbps, "pct_of_read_bw": 100 * gbps / bw["read_GBps"], "max_abs_err_vs_default": err})
        print(f"serving decode B=512 ctx 1024-2047 page 16 splits {splits} block_n {bn:3d} warps {warps} "
              f"stages {stages}: {ms * 1e3:7.1f} us {gbps:6.0f} GB/s {rows[-1]['pct_of_read_bw']:5.1f}%  "
              f"diff {err:.3g}", flush=True)
    return rows


EXTEND_CONFIGS = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)
                  for st in (2, 3, 4)]


def bench_extend_serving() -> list[dict]:
    """The throughput run's mixed steps: about 1,600 prompt tokens a step, here one whole
    1,024-token prompt and the last 604 tokens of another (420 of it computed the step
    before), over a grid of extend_attention launch configs (BLOCK_M, BLOCK_N, warps, stages)."""
    prefixes, news = [0, 420], [1024, 604]
    k, v, table, seq_lens = paged([p + n for p, n in zip(prefixes, news)], 16)
    q = torch.randn(sum(news), H, D, device=DEV, dtype=torch.bfloat16)
    q_start = torch.tensor([0, news[0], sum(news)], dtype=torch.int32, device=DEV)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
    args = (q, k, v, table, q_start, prefix_lens, seq_lens, 16, D ** -0.5, max(news))
    flops = sum(4 * H * D * (n * p + n * (n + 1) / 2) for p, n in zip(prefixes, news))
    want = tk.extend_attention(*args)
    rows = []
    for bm, bn, warps, stages in EXTEND_CONFIGS:
        kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            got = tk.extend_attention(*args, **kw)
            ms = bench_ms(lambda: tk.extend_attention(*args, **kw))
        except Exception as e:                        # e.g. out of shared memory for a config
            print(f"extend {kw}: failed {e!r:.120}")
            continue
        err = (got.float() - want.float()).abs().max().item()
        rows.append({"shape": "1024 new + (420 cached, 604 new)", "config": kw, "ms": ms,
                     "TFLOPs": flops / ms / 1e9, "max_abs_err_vs_default": err})
        print(f"extend serving BLOCK_M {bm:3d} BLOCK_N {bn:3d} warps {warps} stages {stages}: "
              f"{ms * 1e3:7.1f} us {rows[-1]['TFLOPs']:6.1f} TFLOP/s diff {err:.3g}", flush=True)
    return rows


def bench_others() -> list[dict]:
    rows = []

    def record(name, fn, ref_fn, nbytes=None, flops=None):
        ms, ref_ms = bench_ms(fn), bench_ms(ref_fn)
        row = {"kernel": name, "ms": ms, "reference_ms": ref_ms, "speedup": ref_ms / ms}
        extra = ""
        if nbytes:
            row["GBps"] = nbytes / ms / 1e6
            extra = f"{row['GBps']:7.0f} GB/s"
        if flops:
            row["TFLOPs"] = flops / ms / 1e9
            extra = f"{row['TFLOPs']:7.1f} TFLOP/s"
        rows.append(row)
        print(f"{name:44s} {ms * 1e3:9.1f} us  {extra}  torch ref {ref_ms * 1e3:9.1f} us  "
              f"x{row['speedup']:.1f}")

    # prefill: 4 sequences, each 1024 new tokens after a 1024-token cached prefix
    prefixes, news = [1024] * 4, [1024] * 4
    k, v, table, seq_lens = paged([p + n for p, n in zip(prefixes, news)], 16)
    q = torch.randn(sum(news), H, D, device=DEV, dtype=torch.bfloat16)
    q_start = torch.tensor([0, 1024, 2048, 3072, 4096], dtype=torch.int32, device=DEV)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
    args = (q, k, v, table, q_start, prefix_lens, seq_lens, 16, D ** -0.5, 1024)
    flops = sum(4 * H * D * (n * p + n * (n + 1) / 2) for p, n in zip(prefixes, news))
    record("extend_attention 4x(1024 cached + 1024 new)", lambda: tk.extend_attention(*args),
           lambda: ref.extend_attention(*args), flops=flops)

    for tokens in (64, 8192):
        x = torch.randn(tokens, 4096, device=DEV, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
        record(f"fused_add_rmsnorm T={tokens} N=4096", lambda: tk.fused_add_rmsnorm(x, r, w, 1e-5),
               lambda: ref.fused_add_rmsnorm(x, r, w, 1e-5), nbytes=4 * x.numel() * 2)

    cache = tk.rope_cos_sin_cache(D, 131072, 500000.0, None, DEV)
    for tokens in (64, 8192):
        qkv = torch.randn(tokens, H + 2 * KVH, D, device=DEV, dtype=torch.bfloat16)
        pos = torch.randint(0, 131072, (tokens,), device=DEV)
        qv, kv_ = qkv[:, :H], qkv[:, H:H + KVH]
        record(f"apply_rope_ T={tokens}", lambda: tk.apply_rope_(qv, kv_, pos, cache),
               lambda: ref.apply_rope_(qv, kv_, pos, cache), nbytes=2 * tokens * (H + KVH) * D * 2)

        kc = torch.zeros(2 ** 17, KVH, D, device=DEV, dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(2 ** 17, device=DEV)[:tokens]
        kk, vv = qkv[:, H:H + KVH], qkv[:, H + KVH:]
        record(f"store_kv T={tokens}", lambda: tk.store_kv(kk, vv, kc, vc, slots),
               lambda: ref.store_kv(kk, vv, kc, vc, slots), nbytes=2 * 2 * tokens * KVH * D * 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", help="JSON path (default: $OUT/gpu_kernels.json when $OUT is set)")
    ap.add_argument("--quick", action="store_true", help="three decode configs only")
    ap.add_argument("--serving", action="store_true",
                    help="only the throughput run's attention over grids of launch configs: extend "
                         "at its mixed steps' prompt tokens, decode at its batch 512")
    args = ap.parse_args()
    name = torch.cuda.get_device_name(DEV)
    print(f"GPU: {name}  ({torch.cuda.get_device_properties(DEV).multi_processor_count} SMs), "
          f"torch {torch.__version__}, triton {triton.__version__}")
    bw = hbm_bandwidth()
    print(f"HBM read {bw['read_GBps']:.0f} GB/s ({bw['read_method']}); "
          f"copy {bw['copy_GBps']:.0f} GB/s ({bw['copy_method']})")
    if args.serving:
        ext = bench_extend_serving()
        best = max(ext, key=lambda r: r["TFLOPs"])
        print(f"best extend: {best['config']} {best['TFLOPs']:.0f} TFLOP/s")
        rows = bench_decode_serving(bw)
        best = max(rows, key=lambda r: r["GBps"])
        print(f"best: {best['config']} {best['GBps']:.0f} GB/s = {best['pct_of_read_bw']:.1f}%")
        out = args.output or (os.path.join(os.environ["OUT"], "gpu_decode_serving.json") if os.environ.get("OUT")
                              else None)
        if out:
            with open(out, "w") as f:
                json.dump({"gpu": name, "hbm": bw, "decode_serving": rows, "extend_serving": ext}, f, indent=1)
        return
    decode = bench_decode(bw, args.quick)
    ok = [r for r in decode if "ms" in r]
    best = {ps: max((r for r in ok if r["page_size"] == ps), key=lambda r: r["GBps"]) for ps in (16, 64)}
    for ps, r in best.items():
        print(f"best decode page {ps}: {r['config']} {r['GBps']:.0f} GB/s = {r['pct_of_read_bw']:.1f}% "
              f"of measured read bandwidth (target >= 80%)")
    others = bench_others()
    result = {"gpu": name, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(["python3"] + sys.argv), "hbm": bw, "decode": decode,
              "decode_best": {str(k): v for k, v in best.items()}, "others": others}
    out = args.output or (os.path.join(os.environ["OUT"], "gpu_kernels.json") if os.environ.get("OUT") else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
