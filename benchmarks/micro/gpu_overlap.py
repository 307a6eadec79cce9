"""How much would two CUDA streams buy the 8B throughput run? (issue 4's 10k tok/s)

A decode step of the llama-3.1-8b shape at the run's batch is memory-bound decode attention
(the KV reads) then compute-bound GEMMs, one after the other. This times one layer's worth
of each (over several weight copies, so no GEMM reads its weight from L2):

  serial    attention(B) then the four GEMMs(B), one stream: what a decode step does now
  halves    the same in two halves of B/2, one stream: what nano-batching costs by itself
  streams   half A on one stream, half B on another, B's GEMMs first: A's attention can
            run beside B's GEMMs (NanoFlow's nano-batches)
  mixed     a mixed step: the prefill chunk's GEMMs (C tokens) and the decode batch's
            attention, serial against on two streams
  *_urgent  the attention's stream at high priority (its blocks take freed SMs first)
  lt_carve  the GEMMs through cuBLASLt leaving 16-66 SMs free (torch's experimental SM
            carveout), so the attention on the other stream can hold them

Prints the time a layer of each (us) and the share a two-stream engine could save.
Mind the default batch: cuBLAS's kernel for 448 rows is slow (gemm_m_sweep.py), so at 448
`serial` is slow and the halves (224 rows) miss it; the 5-7% that `streams` saved there did
not show in the engine, where nano-batches lost 7-13% at 416-512 rows and were removed.

    python3 benchmarks/micro/gpu_overlap.py [--batch 448] [--chunk 2048] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from kernels import triton as tk  # noqa: E402
from benchmarks.micro.gpu_kernels import DEV, H, KVH, D, paged  # noqa: E402

HIDDEN, INTER = 4096, 14336
SHAPES = {"qkv": ((H + 2 * KVH) * D, HIDDEN), "o": (HIDDEN, H * D),
          "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
COPIES = 4                                             # 4 x 436 MB of weights: none stays in L2


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=448)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8, help="layers a timed call runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    B, L = args.batch, args.layers
    gen = torch.Generator().manual_seed(0)
    lens = (1024 + torch.randint(0, 1024, (B,), generator=gen)).tolist()
    k, v, table, seq_lens = paged(lens, 16, gen=gen)
    q = torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16)
    weights = [{n: torch.randn(s, device=DEV, dtype=torch.bfloat16) * 0.02 for n, s in SHAPES.items()}
               for _ in range(COPIES)]
    halves = [slice(0, B // 2), slice(B // 2, B)]

    def attn(rows: slice) -> torch.Tensor:
        return tk.decode_attention(q[rows], k, v, table[rows], seq_lens[rows], 16, D ** -0.5)

    def gemms(x: torch.Tensor, w: dict) -> torch.Tensor:
        torch.matmul(x, w["qkv"].t())
        y = torch.matmul(x, w["o"].t())
        g = torch.matmul(y, w["gate_up"].t())
        return torch.matmul(g[:, :INTER], w["down"].t())

    xs = {n: torch.randn(n, HIDDEN, device=DEV, dtype=torch.bfloat16) for n in (B, B // 2, args.chunk)}
    side = torch.cuda.Stream()
    urgent = torch.cuda.Stream(priority=-1)            # the block scheduler serves it first

    def serial():
        for i in range(L):
            attn(slice(0, B))
            gemms(xs[B], weights[i % COPIES])

    def halves_one_stream():
        for i in range(L):
            for h in halves:
                attn(h)
                gemms(xs[B // 2], weights[i % COPIES])

    def forked(other: torch.cuda.Stream, here, there, there_first: bool = False):
        """here() on the current stream and there() on `other`, forked and joined; the one
        enqueued first gets a head start on the GPU."""
        def run():
            main_s = torch.cuda.current_stream()
            other.wait_stream(main_s)
            if not there_first:
                here()
            with torch.cuda.stream(other):
                there()
            if there_first:
                here()
            main_s.wait_stream(other)
        return run

    def half_a():                                   # attention first
        for i in range(L):
            attn(halves[0])
            gemms(xs[B // 2], weights[i % COPIES])

    def half_b():                                   # GEMMs first
        for i in range(L):
            gemms(xs[B // 2], weights[(i + 1) % COPIES])
            attn(halves[1])

    def mixed_serial():
        for i in range(L):
            gemms(xs[args.chunk], weights[i % COPIES])
            attn(slice(0, B))

    def chunk_gemms():
        for i in range(L):
            gemms(xs[args.chunk], weights[i % COPIES])

    def batch_attention():
        for i in range(L):
            attn(slice(0, B))

    two_streams = forked(side, half_a, half_b)
    streams_urgent = forked(urgent, half_b, half_a, there_first=True)   # half A, high priority, first
    mixed_streams = forked(side, chunk_gemms, batch_attention)
    mixed_urgent = forked(urgent, chunk_gemms, batch_attention)   # attention takes freed SMs first

    parts = {"attention": lambda: [attn(slice(0, B)) for _ in range(L)],
             "gemms": lambda: [gemms(xs[B], weights[i % COPIES]) for i in range(L)],
             "prefill_gemms": lambda: [gemms(xs[args.chunk], weights[i % COPIES]) for i in range(L)]}
    runs = {"serial": serial, "halves": halves_one_stream, "streams": two_streams,
            "mixed_serial": mixed_serial, "mixed_streams": mixed_streams, "mixed_urgent": mixed_urgent,
            "streams_urgent": streams_urgent}
    result = {"bench": "gpu_overlap", "gpu": torch.cuda.get_device_name(), "batch": B, "chunk": args.chunk,
              "contexts": "1024-2047", "page_size": 16, "layers": L, "shape": "llama-3.1-8b layer (attention + 4 GEMMs)"}
    for name, fn in {**parts, **runs}.items():
        result[f"{name}_ms_per_layer"] = bench_ms(fn) / L
        print(f"{name:14s} {result[f'{name}_ms_per_layer'] * 1e3:8.1f} us a layer", flush=True)
    carve(result, parts, mixed_serial, mixed_streams, streams_urgent)
    for a, b in (("serial", "streams"), ("halves", "streams"), ("serial", "streams_urgent"),
                 ("mixed_serial", "mixed_streams"), ("mixed_serial", "mixed_urgent")):
        saved = 1 - result[f"{b}_ms_per_layer"] / result[f"{a}_ms_per_layer"]
        result[f"saved_{b}_vs_{a}"] = saved
        print(f"{b} against {a}: {100 * saved:+.1f}% of the time saved")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def carve(result: dict, parts: dict, mixed_serial, mixed_streams, streams_urgent) -> None:
    """SM partitioning through cuBLASLt's SM-count target (torch's experimental carveout):
    the GEMMs leave `x` SMs free, which the attention on the other stream can hold."""
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if setter is None:
        print("no torch._C._set_sm_carveout_experimental: carveout rows skipped")
        return
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        for x in (0, 16, 32, 48, 66):
            setter(x)
            for name, fn in (("gemms", parts["gemms"]), ("prefill_gemms", parts["prefill_gemms"]),
                             ("mixed_serial", mixed_serial), ("mixed_streams", mixed_streams),
                             ("streams_urgent", streams_urgent)):
                key = f"lt_carve{x}_{name}_ms_per_layer"
                result[key] = bench_ms(fn) / result["layers"]
                print(f"carveout {x:3d} SMs, cublaslt: {name:14s} {result[key] * 1e3:8.1f} us a layer", flush=True)
    finally:
        setter(None)
        torch.backends.cuda.preferred_blas_library("default")


if __name__ == "__main__":
    main()
