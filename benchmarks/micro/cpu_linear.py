"""Linear-layer options for SmolLM2-135M on CPU: full-model-equivalent weight set.

Runs every option over 30 layers' linears (+ tied lm_head 49152x576) for a given
batch (M rows), reports median ms and effective weight-read GB/s.

usage: python benchmarks/micro/cpu_linear.py --dtype bf16 --batch 1 16 64 --threads 1 2
"""
import argparse
import sys
import os

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import LAYER_LINEARS, FUSED_LINEARS, NLAYERS, VOCAB, HIDDEN, bench_interleaved  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="bf16")
p.add_argument("--batch", type=int, nargs="+", default=[1])
p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
p.add_argument("--reps", type=int, default=11)
p.add_argument("--opts", nargs="*", default=None)
p.add_argument("--no-lm-head", action="store_true")
args = p.parse_args()
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
torch.manual_seed(0)


def make(shapes):
    ws = []
    for _ in range(NLAYERS):
        for name, o, i in shapes:
            ws.append((torch.randn(o, i) * 0.02).to(dt))
    if not args.no_lm_head:
        ws.append((torch.randn(VOCAB, HIDDEN) * 0.02).to(dt))
    return ws


sep = make(LAYER_LINEARS)
fused = make(FUSED_LINEARS)
nbytes = sum(w.numel() * w.element_size() for w in sep)


def inputs(ws, m):
    xs = {}
    for w in ws:
        k = w.shape[1]
        if k not in xs:
            xs[k] = torch.randn(m, k).to(dt)
    return xs


def run_seq(fn, ws, xs):
    # each linear reads its own input (like the model: x is tiny, weights are streamed)
    def f():
        for w in ws:
            fn(xs[w.shape[-1]] if w.dim() == 2 else xs[w.size(-1)], w)
    return f


results = []


def report(name, m, th, med, mn):
    gbs = nbytes / (med * 1e-3) / 1e9
    results.append((name, m, th, med))
    print(f"  {name:34s} M={m:<4d} thr={th}  {med:8.2f} ms  (min {mn:7.2f})  {gbs:5.1f} GB/s", flush=True)


def options(m):
    opts = {}
    xs = inputs(sep, m)
    opts["F.linear [out,in]"] = run_seq(F.linear, sep, xs)
    xsf = inputs(fused, m)
    opts["F.linear fused qkv/gate_up"] = run_seq(F.linear, fused, xsf)
    wt = [w.t().contiguous() for w in sep]
    xs_t = {w.shape[0]: xs[w.shape[0]] for w in wt}

    def f_mm():
        for w in wt:
            torch.mm(xs_t[w.shape[0]], w)
    opts["torch.mm x@Wt (Wt [in,out] contig)"] = f_mm
    # F.linear with a transposed view of [in,out] storage
    wtv = [w.t() for w in wt]
    opts["F.linear(W=[in,out].t() view)"] = run_seq(F.linear, wtv, xs)
    # oneDNN prepacked (what inductor freezing uses)
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, m) for w in fused]

        def f_dnn():
            for w, w0 in zip(packed, fused):
                torch.ops.mkldnn._linear_pointwise(xsf[w0.shape[1]], w, None, "none", [], "")
        opts["mkldnn._linear_pointwise packed fused"] = f_dnn
        packed_nb = [torch.ops.mkldnn._reorder_linear_weight(w) for w in fused]

        def f_dnn2():
            for w, w0 in zip(packed_nb, fused):
                torch.ops.mkldnn._linear_pointwise(xsf[w0.shape[1]], w, None, "none", [], "")
        opts["mkldnn._linear_pointwise packed(no bs)"] = f_dnn2
    except Exception as e:  # noqa
        print("  mkldnn packed failed:", repr(e)[:200])
    # torch.utils.mkldnn style: opaque mkldnn tensors
    try:
        mk_w = [w.to_mkldnn() for w in fused]
        mk_x = {k: v.to_mkldnn() for k, v in xsf.items()}

        def f_mk():
            for w, w0 in zip(mk_w, fused):
                torch._C._nn.mkldnn_linear(mk_x[w0.shape[1]], w)
        opts["mkldnn_linear opaque tensors fused"] = f_mk
    except Exception as e:  # noqa
        print("  mkldnn opaque failed:", repr(e)[:200])
    if dt == torch.float32:
        try:
            mkl_w = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in fused]

            def f_mkl():
                for w, w0 in zip(mkl_w, fused):
                    torch.ops.mkl._mkl_linear(xsf[w0.shape[1]], w, w0, None, m)
            opts["mkl._mkl_linear packed fused"] = f_mkl
        except Exception as e:  # noqa
            print("  mkl packed failed:", repr(e)[:200])
    if args.opts:
        opts = {k: v for k, v in opts.items() if any(s in k for s in args.opts)}
    return opts


print(f"dtype={args.dtype} weights={nbytes/1e6:.1f} MB  lm_head={'no' if args.no_lm_head else 'yes'}")
for m in args.batch:
    opts = options(m)
    for th in args.threads:
        torch.set_num_threads(th)
        good = {}
        for name, fn in opts.items():
            try:
                fn()
                good[name] = fn
            except Exception as e:  # noqa
                print(f"  {name}: FAILED {repr(e)[:200]}")
        res = bench_interleaved(good, reps=args.reps)
        for name, (med, mn) in res.items():
            report(name, m, th, med, mn)
