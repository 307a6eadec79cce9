"""Cost of the non-matmul ops of one SmolLM2 decoder layer in eager (us per layer), and
attention variants for decode, and how much torch.compile fusion of those pieces saves.

usage: python benchmarks/micro/cpu_layer_ops.py --dtype bf16 --batch 1 --kv 128 --tmax 256
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import bench_interleaved  # noqa: E402
from smollm_cpu_model import HIDDEN, INTER, NH, NKV, HD, rms_norm, rope_cos_sin, rotate_half  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="bf16")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--kv", type=int, default=128)
p.add_argument("--tmax", type=int, default=256)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--reps", type=int, default=15)
p.add_argument("--no-compile", action="store_true")
args = p.parse_args()
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
torch.set_num_threads(args.threads)
B, T, KV = args.batch, args.tmax, args.kv
N = 100  # inner loop count per sample

h = torch.randn(B, 1, HIDDEN).to(dt)
lnw = torch.ones(HIDDEN, dtype=dt)
qkv = torch.randn(B, 1, NH + 2 * NKV, HD).to(dt).transpose(1, 2)  # [B, 12, 1, HD] view like model
q = qkv[:, :NH]
k = qkv[:, NH:NH + NKV]
v = qkv[:, NH + NKV:]
pos = torch.full((B, 1), KV - 1, dtype=torch.long)
cos, sin = rope_cos_sin(pos, dt)
cos, sin = cos[:, None], sin[:, None]
kc = torch.randn(B, NKV, T, HD).to(dt)
vc = torch.randn(B, NKV, T, HD).to(dt)
mask = torch.where(torch.arange(T)[None, None, None, :] <= pos[:, None, :, None], 0.0, float("-inf")).to(dt)
gu = torch.randn(B, 2 * INTER).to(dt)
o = torch.randn(B, 1, HIDDEN).to(dt)
idx = pos[:, None, :, None].expand(B, NKV, 1, HD)
qc = q.contiguous()


def rope():
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def kv_write():
    kc.scatter_(2, idx, k)
    vc.scatter_(2, idx, v)


def kv_write_index():
    kc[:, :, KV - 1:KV] = k
    vc[:, :, KV - 1:KV] = v


def sdpa_mask_tmax():
    return F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, enable_gqa=True)


def sdpa_slice():
    return F.scaled_dot_product_attention(qc, kc[:, :, :KV], vc[:, :, :KV], enable_gqa=True)


def sdpa_slice_expand():
    # no enable_gqa: expand kv heads (view) and reshape to 3D bmm-friendly form
    kk = kc[:, :, None, :KV].expand(B, NKV, NH // NKV, KV, HD).reshape(B, NH, KV, HD)
    vv = vc[:, :, None, :KV].expand(B, NKV, NH // NKV, KV, HD).reshape(B, NH, KV, HD)
    return F.scaled_dot_product_attention(qc, kk, vv)


def attn_manual():
    # GQA decode as 2 batched matmuls: q [B, NKV, G, HD] x K^T [B, NKV, HD, KV]
    qg = qc.view(B, NKV, NH // NKV, HD)
    s = torch.matmul(qg, kc[:, :, :KV].transpose(-1, -2)) * (HD ** -0.5)
    pr = torch.softmax(s.float(), -1).to(dt)
    return torch.matmul(pr, vc[:, :, :KV])


def attn_manual_mask():
    qg = qc.view(B, NKV, NH // NKV, HD)
    s = torch.matmul(qg, kc.transpose(-1, -2)) * (HD ** -0.5) + mask.view(B, 1, 1, T)
    pr = torch.softmax(s.float(), -1).to(dt)
    return torch.matmul(pr, vc)


def attn_mulsum():
    # elementwise formulation (no GEMM dispatch): fp32 accumulate
    qg = qc.view(B, NKV, NH // NKV, 1, HD).float()
    s = (qg * kc[:, :, None, :KV].float()).sum(-1) * (HD ** -0.5)  # [B, NKV, G, KV]
    pr = torch.softmax(s, -1)
    return (pr[..., None] * vc[:, :, None, :KV].float()).sum(-2).to(dt)


def attn_fp32_bmm():
    qg = qc.view(B, NKV, NH // NKV, HD).float()
    s = torch.matmul(qg, kc[:, :, :KV].float().transpose(-1, -2)) * (HD ** -0.5)
    pr = torch.softmax(s, -1)
    return torch.matmul(pr, vc[:, :, :KV].float()).to(dt)


def silu_mul():
    g, u = gu.split(INTER, -1)
    return F.silu(g) * u


def residual():
    return h + o


def all_nonmatmul():
    x = rms_norm(h, lnw)
    rope()
    kv_write()
    attn_manual()
    h2 = h + o
    x = rms_norm(h2, lnw)
    silu_mul()
    return h2 + o


ops = {"rms_norm": lambda: rms_norm(h, lnw), "rope(q,k)": rope, "kv write scatter_": kv_write,
       "kv write slice-assign": kv_write_index,
       "sdpa mask over TMAX (gqa)": sdpa_mask_tmax, "sdpa sliced [:kv] (gqa)": sdpa_slice,
       "sdpa sliced, expand kv": sdpa_slice_expand,
       "manual attn sliced": attn_manual, "attn mul-sum fp32": attn_mulsum, "attn bmm fp32 upcast": attn_fp32_bmm, "manual attn mask TMAX": attn_manual_mask,
       "silu*mul": silu_mul, "residual add": residual,
       "all non-matmul (2 rms, rope, kv, manual attn, silu, 2 add)": all_nonmatmul}

ref = sdpa_slice()
for name, f in [("sdpa_mask_tmax", sdpa_mask_tmax), ("sdpa_slice_expand", sdpa_slice_expand),
                ("attn_manual", attn_manual), ("attn_manual_mask", attn_manual_mask), ("attn_mulsum", attn_mulsum), ("attn_fp32_bmm", attn_fp32_bmm)]:
    out = f().reshape(ref.shape)
    print(f"  check {name}: max|diff| vs sdpa sliced = {(out.float() - ref.float()).abs().max().item():.3g}")

if not args.no_compile:
    import torch._inductor.config as ic
    ic.cpp_wrapper = False

    def layer_nonmatmul(h, o, gu, q, k, cos, sin, kc, vc, idx, lnw):
        x = rms_norm(h, lnw)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        kc.scatter_(2, idx, k)
        vc.scatter_(2, idx, v)
        qg = q.reshape(B, NKV, NH // NKV, HD)
        s = torch.matmul(qg, kc[:, :, :KV].transpose(-1, -2)) * (HD ** -0.5)
        pr = torch.softmax(s.float(), -1).to(dt)
        a = torch.matmul(pr, vc[:, :, :KV])
        h2 = h + o
        x2 = rms_norm(h2, lnw)
        g, u = gu.split(INTER, -1)
        m = F.silu(g) * u
        return x, a, x2, m, h2 + o

    cf = torch.compile(layer_nonmatmul, dynamic=False)
    cargs = (h, o, gu, q, k, cos, sin, kc, vc, idx, lnw)
    with torch.inference_mode():
        cf(*cargs)
    ops["compiled all non-matmul"] = lambda: cf(*cargs)
    ic.cpp_wrapper = True
    torch._dynamo.reset()
    cf2 = torch.compile(layer_nonmatmul, dynamic=False)
    with torch.inference_mode():
        cf2(*cargs)
    ops["compiled all non-matmul, cpp_wrapper"] = lambda: cf2(*cargs)

fns = {k_: (lambda f=f: [f() for _ in range(N)]) for k_, f in ops.items()}
with torch.inference_mode():
    res = bench_interleaved(fns, reps=args.reps)
print(f"dtype={args.dtype} B={B} kv={KV} tmax={T} threads={args.threads}  (us per call)")
for name, (med, mn) in res.items():
    print(f"  {name:58s} {med*1e3/N:8.1f} us  (min {mn*1e3/N:7.1f})")
