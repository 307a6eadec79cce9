"""kernels/triton on a CUDA GPU: every kernel against its torch reference (fp32 math) over
a sweep of dtypes, batch sizes, context lengths, head layouts and page sizes, and
decode attention captured in a CUDA graph and replayed with new lengths and pages.

Skipped without CUDA. Run on its own (Triton must not be in interpreter mode, which
tests/unit/test_triton_kernels.py puts a process in).
"""
from __future__ import annotations

import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
import triton.language as tl  # noqa: E402

if isinstance(tl.standard.max, InterpretedFunction):
    pytest.skip("Triton is in interpreter mode in this process; run this file on its own",
                allow_module_level=True)

from kernels import triton as tk  # noqa: E402
from kernels.triton import reference as ref  # noqa: E402

if tk.interpreted():
    tk.reload_kernels()

DEV = torch.device("cuda")
# name: (q heads, kv heads, head dim)
LAYOUTS = {"llama-3.1-8b": (32, 8, 128), "llama-3.2-1b": (32, 8, 64),
           "qwen2.5-0.5b": (14, 2, 64), "smollm2-135m": (9, 3, 64)}
DTYPES = [torch.bfloat16, torch.float16]
PAGE_SIZES = [1, 16, 64]
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def paged_kv(lens, page_size, kvh, d, dtype, width=None, gen=None):
    """Random caches and a shuffled page table (page 0 reserved and zero, pads the rows)."""
    need = [triton.cdiv(n, page_size) for n in lens]
    width = width or max(need)
    pages = torch.randperm(sum(need), generator=gen) + 1
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = pages[at:at + n].int()
        at += n
    slots = (sum(need) + 1) * page_size
    k = torch.randn(slots, kvh, d, device=DEV, dtype=dtype)
    v = torch.randn(slots, kvh, d, device=DEV, dtype=dtype)
    k[:page_size] = 0
    v[:page_size] = 0
    return k, v, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def ragged(batch: int, max_ctx: int, gen) -> list[int]:
    """Lengths in [1, max_ctx] including both ends."""
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen).tolist()
    lens[0] = max_ctx
    if batch > 1:
        lens[1] = 1
    return lens


# batch x longest context; the reference pads every row to the longest, so keep B * ctx modest
DECODE_SHAPES = [(1, 8192), (8, 8192), (64, 1024), (128, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_attention_sweep(layout, page_size, dtype):
    h, kvh, d = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    for batch, ctx in DECODE_SHAPES:
        torch.manual_seed(batch)
        k, v, table, seq_lens = paged_kv(ragged(batch, ctx, gen), page_size, kvh, d, dtype, gen=gen)
        q = torch.randn(batch, h, d, device=DEV, dtype=dtype)
        want = ref.decode_attention(q, k, v, table, seq_lens, page_size, d ** -0.5)
        for splits in (None, 1, 7):
            got = tk.decode_attention(q, k, v, table, seq_lens, page_size, d ** -0.5, num_splits=splits)
            close(got, want, dtype)


EXTEND_SEQS = [(0, 1000), (3000, 500), (0, 1), (8000, 192), (17, 33), (64, 64)]   # (prefix, new)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_extend_attention_sweep(layout, page_size, dtype):
    h, kvh, d = LAYOUTS[layout]
    torch.manual_seed(0)
    prefixes, news = zip(*EXTEND_SEQS)
    lens = [p + n for p, n in EXTEND_SEQS]
    k, v, table, seq_lens = paged_kv(lens, page_size, kvh, d, dtype)
    q_start = torch.tensor([0] + torch.tensor(news).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
    q = torch.randn(sum(news), h, d, device=DEV, dtype=dtype)
    args = (q, k, v, table, q_start, prefix_lens, seq_lens, page_size, d ** -0.5, max(news))
    close(tk.extend_attention(*args), ref.extend_attention(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [4096, 2048, 896, 576])
def test_fused_add_rmsnorm(hidden, dtype):
    torch.manual_seed(0)
    for tokens in (1, 300):
        x = torch.randn(tokens, hidden, device=DEV, dtype=dtype)
        res = torch.randn(tokens, hidden, device=DEV, dtype=dtype)
        w = torch.randn(hidden, device=DEV, dtype=dtype)
        for r in (None, res):
            y, r_out = tk.fused_add_rmsnorm(x, r, w, 1e-5)
            y_ref, r_ref = ref.fused_add_rmsnorm(x, r, w, 1e-5)
            assert torch.equal(r_out, r_ref)
            close(y, y_ref, dtype)
            if dtype != torch.float32:   # same roundings: at most a few elements one ulp apart
                assert (y != y_ref).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("inter", [14336, 8192, 4864, 1536])
def test_silu_mul(inter, dtype):
    import torch.nn.functional as F
    torch.manual_seed(0)
    for tokens in (1, 300):
        gate_up = torch.randn(tokens, 2 * inter, device=DEV, dtype=dtype) * 3
        out = tk.silu_mul(gate_up)
        gate, up = gate_up.split(inter, dim=-1)
        want = F.silu(gate) * up             # what layers.GatedMLP ran before
        close(out, ref.silu_mul(gate_up), dtype)
        if dtype != torch.float32:           # same roundings: at most a few elements one ulp apart
            assert (out != want).float().mean() < 0.01


# (hidden, q+2kv, intermediate, vocab) of the shapes
GEMV_MODELS = {"llama-3.1-8b": (4096, 6144, 14336, 128256), "llama-3.2-1b": (2048, 3072, 8192, 128256),
               "qwen2.5-0.5b": (896, 1152, 4864, 151936), "smollm2-135m": (576, 960, 1536, 49152)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", list(GEMV_MODELS))
def test_gemv(model, dtype):
    """Every matmul of the model (qkv with a bias, as Qwen2's) at 1 row, and at 3 rows, against an
    fp32 matmul of the same inputs."""
    hidden, qkv, inter, vocab = GEMV_MODELS[model]
    torch.manual_seed(0)
    for n, k in ((qkv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter), (vocab, hidden)):
        w = torch.randn(n, k, device=DEV, dtype=dtype) / k ** 0.5
        bias = torch.randn(n, device=DEV, dtype=dtype) if n == qkv else None
        for m in (1, 3):
            x = torch.randn(m, k, device=DEV, dtype=dtype)
            close(tk.gemv(x, w, bias), ref.gemv(x, w, bias), dtype)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rope(layout, scaling, dtype):
    h, kvh, d = LAYOUTS[layout]
    torch.manual_seed(0)
    cache = tk.rope_cos_sin_cache(d, 131072, 500000.0, scaling, DEV)
    for tokens in (1, 333):
        qkv = torch.randn(tokens, h + 2 * kvh, d, device=DEV, dtype=dtype)
        pos = torch.randint(0, 131072, (tokens,), device=DEV)
        got, want = qkv.clone(), qkv.clone()
        tk.apply_rope_(got[:, :h], got[:, h:h + kvh], pos, cache)
        ref.apply_rope_(want[:, :h], want[:, h:h + kvh], pos, cache)
        close(got, want, dtype)
        assert torch.equal(got[:, h + kvh:], qkv[:, h + kvh:])
        # with the fused KV store: the same rotation, and the caches store_kv would write
        slots = torch.randperm(4096, device=DEV)[:tokens]
        slots[::5] = -1
        kc = torch.zeros(4096, kvh, d, device=DEV, dtype=dtype)
        vc, kc2, vc2 = torch.zeros_like(kc), kc.clone(), kc.clone()
        fused = qkv.clone()
        tk.apply_rope_(fused[:, :h], fused[:, h:h + kvh], pos, cache, (fused[:, h + kvh:], kc, vc, slots))
        tk.store_kv(got[:, h:h + kvh], got[:, h + kvh:], kc2, vc2, slots)
        assert torch.equal(fused, got) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv(dtype):
    torch.manual_seed(0)
    kvh, d, tokens = 8, 128, 500
    kv = torch.randn(tokens, 2, kvh, d, device=DEV, dtype=dtype)
    slots = torch.randperm(4096, device=DEV)[:tokens]
    slots[::7] = -1
    kc = torch.zeros(4096, kvh, d, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    kc2, vc2 = kc.clone(), vc.clone()
    tk.store_kv(kv[:, 0], kv[:, 1], kc, vc, slots)
    ref.store_kv(kv[:, 0], kv[:, 1], kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_attention_cuda_graph_replay(page_size):
    """Captured once on static inputs; replays with other lengths and page tables equal eager runs."""
    h, kvh, d = LAYOUTS["llama-3.1-8b"]
    dtype, batch, max_ctx = torch.bfloat16, 8, 2048
    width = max_ctx // page_size
    k, v, _, _ = paged_kv([max_ctx] * batch, page_size, kvh, d, dtype)
    q = torch.randn(batch, h, d, device=DEV, dtype=dtype)
    table = torch.zeros(batch, width, dtype=torch.int32, device=DEV)
    seq_lens = torch.ones(batch, dtype=torch.int32, device=DEV)
    out = torch.empty(batch, h, d, device=DEV, dtype=dtype)

    def step():
        tk.decode_attention(q, k, v, table, seq_lens, page_size, d ** -0.5, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                   # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    gen = torch.Generator().manual_seed(3)
    num_pages = k.shape[0] // page_size - 1
    for trial in range(3):
        lens = ragged(batch, max_ctx, gen) if trial else [1] * batch
        new_table = torch.zeros(batch, width, dtype=torch.int32)
        for b, n in enumerate(lens):
            need = triton.cdiv(n, page_size)
            new_table[b, :need] = (torch.randperm(num_pages, generator=gen)[:need] + 1).int()
        table.copy_(new_table)
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        eager = tk.decode_attention(q, k, v, table, seq_lens, page_size, d ** -0.5)
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
        close(out, ref.decode_attention(q, k, v, table, seq_lens, page_size, d ** -0.5), dtype)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
