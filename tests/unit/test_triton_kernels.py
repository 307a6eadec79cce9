"""kernels/triton against their torch references, on CPU under Triton's interpreter.

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit: its
own library functions (tl.max, tl.sum, ...) when triton is imported, ours when
kernels.triton first imports their modules. So this module sets it before
importing triton (pytest imports test modules at collection, before any test
runs), decorates every kernel, and then restores the variable; the process's
Triton stays in interpreter mode. If triton was imported earlier without it
(e.g. tests/gpu collected first on a CUDA machine), the module skips: run it on
its own there. The interpreter gives NaN for bf16 on CPU, so only fp32 and fp16
run here; tests/gpu sweeps bf16.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def _triton_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl
    return isinstance(tl.standard.max, InterpretedFunction)


def _fix_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into a loop bound with
    int(array), which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream by #9172)."""
    from triton.runtime import interpreter
    patch = interpreter._patch_lang_tensor
    if getattr(patch, "tandem_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    patched.tandem_fixed = True
    interpreter._patch_lang_tensor = patched


if "triton" in sys.modules and not _triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set in this process; "
                "run this file on its own", allow_module_level=True)

_saved_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from kernels import triton as tk
    from kernels.triton import reference as ref
    _fix_interpreter_for_numpy_2_4()
    tk.reload_kernels()          # a kernel module imported earlier was decorated without it
    for _name in tk.__all__:
        getattr(tk, _name)       # decorate every kernel now
    assert tk.interpreted() and _triton_interpreted()
finally:
    if _saved_env is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_env


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    """Triton also reads the variable while running interpreted kernels."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    yield
    mp.undo()


TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


def paged_kv(lens: list[int], page_size: int, kvh: int, d: int, dtype, extra_pages: int = 1):
    """Random caches and a shuffled page table for sequences of `lens` tokens; page 0 stays
    zero and pads the table's rows (extra_pages more columns than the longest needs)."""
    need = [triton.cdiv(n, page_size) for n in lens]
    width = max(need) + extra_pages
    pages = torch.randperm(sum(need), dtype=torch.int32) + 1
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = pages[at:at + n]
        at += n
    slots = (sum(need) + 1) * page_size
    k = torch.randn(slots, kvh, d).to(dtype)
    v = torch.randn(slots, kvh, d).to(dtype)
    k[:page_size] = 0
    v[:page_size] = 0
    return k, v, table, torch.tensor(lens, dtype=torch.int32)


# ---- decode attention --------------------------------------------------------------------

DECODE_CASES = [  # heads, kv heads, head dim, page size, seq lens, num_splits
    (4, 4, 32, 1, [1, 9, 40], None),          # MHA, page 1
    (8, 2, 16, 4, [1, 17, 64, 33], 3),        # GQA 4, splits > 1, one seq of 1 token
    (8, 1, 16, 16, [70, 1, 16], 2),           # GQA 8 (MQA), full and partial pages
    (6, 2, 24, 16, [5, 48], 8),               # non-power-of-2 group and head dim; empty splits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,kvh,d,ps,lens,splits", DECODE_CASES)
def test_decode_attention(dtype, h, kvh, d, ps, lens, splits):
    torch.manual_seed(0)
    k, v, table, seq_lens = paged_kv(lens, ps, kvh, d, dtype)
    q = torch.randn(len(lens), h, d).to(dtype)
    out = tk.decode_attention(q, k, v, table, seq_lens, ps, d ** -0.5, num_splits=splits)
    close(out, ref.decode_attention(q, k, v, table, seq_lens, ps, d ** -0.5), dtype)


def test_decode_attention_strided_q_and_out():
    """q as a view of a fused qkv tensor (head stride != token stride / H), into `out`."""
    torch.manual_seed(1)
    k, v, table, seq_lens = paged_kv([30, 3], 4, 2, 16, torch.float32)
    qkv = torch.randn(2, 8 + 2 + 2, 16)
    q = qkv[:, :8]
    out = torch.empty(2, 8, 16)
    got = tk.decode_attention(q, k, v, table, seq_lens, 4, 0.3, out=out, num_splits=2)
    assert got is out
    close(out, ref.decode_attention(q, k, v, table, seq_lens, 4, 0.3), torch.float32)


def test_default_num_splits_depends_on_shapes_only():
    from kernels.triton.decode import default_num_splits
    dev = torch.device("cpu")
    assert default_num_splits(1, 8, 512, 16, dev) > 1            # few programs, long table: split
    assert default_num_splits(1, 8, 1, 16, dev) == 1             # a 16-token table: no split
    assert default_num_splits(512, 8, 512, 16, dev) == 1         # enough programs already


# ---- extend attention --------------------------------------------------------------------

EXTEND_CASES = [  # heads, kv heads, head dim, page size, prefix lens, new-token counts
    (4, 4, 16, 1, [0, 0], [19, 5]),            # plain prefill, MHA, page 1
    (8, 2, 16, 4, [0, 13, 40], [33, 1, 7]),   # GQA 4, with and without prefix, a 1-token row
    (8, 1, 32, 16, [21, 0, 5], [18, 16, 0]),  # GQA 8, page 16, a sequence with no new tokens
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,kvh,d,ps,prefixes,news", EXTEND_CASES)
def test_extend_attention(dtype, h, kvh, d, ps, prefixes, news):
    torch.manual_seed(0)
    lens = [p + n for p, n in zip(prefixes, news)]
    k, v, table, seq_lens = paged_kv([max(n, 1) for n in lens], ps, kvh, d, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q_start = torch.tensor([0] + torch.tensor(news).cumsum(0).tolist(), dtype=torch.int32)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32)
    q = torch.randn(sum(news), h, d).to(dtype)
    args = (q, k, v, table, q_start, prefix_lens, seq_lens, ps, d ** -0.5, max(news))
    close(tk.extend_attention(*args), ref.extend_attention(*args), dtype)


def test_extend_of_one_token_equals_decode():
    torch.manual_seed(2)
    k, v, table, seq_lens = paged_kv([12, 40, 1], 4, 2, 16, torch.float32)
    q = torch.randn(3, 4, 16)
    q_start = torch.arange(4, dtype=torch.int32)
    ext = tk.extend_attention(q, k, v, table, q_start, seq_lens - 1, seq_lens, 4, 0.25, 1)
    close(ext, tk.decode_attention(q, k, v, table, seq_lens, 4, 0.25), torch.float32)


# ---- norm, rope, store --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rmsnorm(dtype, with_residual):
    from services.engine.layers import RMSNorm
    torch.manual_seed(0)
    x, res = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype)
    norm = RMSNorm(96, 1e-6).to(dtype)
    norm.weight.data.normal_()
    y, r = tk.fused_add_rmsnorm(x, res if with_residual else None, norm.weight.data, 1e-6)
    want_r = x + res if with_residual else x
    assert torch.equal(r, want_r)
    with torch.no_grad():
        want_y = norm(want_r)            # the layer the model runs elsewhere (torch path)
    y_ref, _ = ref.fused_add_rmsnorm(x, res if with_residual else None, norm.weight.data, 1e-6)
    close(y, y_ref, dtype)
    close(y, want_y, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens, inter", [(1, 64), (5, 96), (3, 1500)])
def test_silu_mul(dtype, tokens, inter):
    """The GatedMLP's torch path, bit for bit up to exp's last bits; inter of 1500 takes two
    column blocks, the second partly masked."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    gate_up = (torch.randn(tokens, 2 * inter) * 3).to(dtype)
    out = tk.silu_mul(gate_up)
    gate, up = gate_up.split(inter, dim=-1)
    close(out, F.silu(gate) * up, dtype)
    close(out, ref.silu_mul(gate_up), dtype)
    assert out.shape == (tokens, inter) and out.dtype == dtype


# ---- matrix-vector product ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k", [(1, 40, 96), (3, 17, 300), (8, 64, 64)])
def test_gemv(dtype, m, n, k):
    """One row and more, N and K not multiples of the blocks, with and without bias."""
    torch.manual_seed(0)
    x, w, b = torch.randn(m, k).to(dtype), (torch.randn(n, k) / k ** 0.5).to(dtype), torch.randn(n).to(dtype)
    close(tk.gemv(x, w), ref.gemv(x, w), dtype)
    close(tk.gemv(x, w, b), ref.gemv(x, w, b), dtype)
    close(tk.gemv(x, w, b, config=(32, 64, 4, 2)), ref.gemv(x, w, b), dtype)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_rope(dtype, scaling):
    from services.engine.layers import RotaryEmbedding
    torch.manual_seed(0)
    h, kvh, d = 6, 2, 32
    qkv = torch.randn(5, h + 2 * kvh, d).to(dtype)   # q, k as views of one tensor, like the model
    pos = torch.tensor([0, 1, 63, 200, 511])
    cache = tk.rope_cos_sin_cache(d, 512, 10000.0, scaling, "cpu")
    rot = RotaryEmbedding(d, 512, 10000.0, scaling)
    got, want = qkv.clone(), qkv.clone()
    tk.apply_rope_(got[:, :h], got[:, h:h + kvh], pos, cache)
    ref.apply_rope_(want[:, :h], want[:, h:h + kvh], pos, cache)
    close(got, want, dtype)
    assert torch.equal(got[:, h + kvh:], qkv[:, h + kvh:])     # v untouched
    layer = rot.prepare(pos, qkv.float())(qkv[:, :h + kvh].float())   # fp32 layer path
    close(got[:, :h + kvh], layer, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_with_kv_store(dtype):
    """The rotary kernel's fused KV store: q, k rotated as apply_rope_ alone does, and the
    caches hold what store_kv of the rotated k and of v writes (slot -1: nothing)."""
    torch.manual_seed(0)
    h, kvh, d = 6, 3, 32
    qkv = torch.randn(5, h + 2 * kvh, d).to(dtype)
    pos = torch.tensor([0, 1, 63, 200, 511])
    slots = torch.tensor([7, -1, 0, 31, 12])
    cache = tk.rope_cos_sin_cache(d, 512, 10000.0, None, "cpu")
    got, want = qkv.clone(), qkv.clone()
    kc, vc = torch.zeros(32, kvh, d, dtype=dtype), torch.zeros(32, kvh, d, dtype=dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    tk.apply_rope_(got[:, :h], got[:, h:h + kvh], pos, cache, (got[:, h + kvh:], kc, vc, slots))
    ref.apply_rope_(want[:, :h], want[:, h:h + kvh], pos, cache)
    ref.store_kv(want[:, h:h + kvh], want[:, h + kvh:], kc2, vc2, slots)
    close(got, want, dtype)
    close(kc, kc2, dtype)
    assert torch.equal(vc, vc2) and torch.equal(kc[31], got[3, h:h + kvh])
    assert int((kc.abs().sum((1, 2)) > 0).sum()) == 4
    with pytest.raises(ValueError, match="slots"):
        tk.apply_rope_(got[:, :h], got[:, h:h + kvh], pos, cache, (got[:, h + kvh:], kc, vc, slots.int()))
    with pytest.raises(ValueError, match="v_cache"):
        tk.apply_rope_(got[:, :h], got[:, h:h + kvh], pos, cache, (got[:, h + kvh:], kc, vc[:, :1], slots))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_skips_minus_one(dtype):
    torch.manual_seed(0)
    kv = torch.randn(5, 2, 3, 16).to(dtype)            # strided k, v views: [T, 2(k/v), KVH, D]
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.tensor([7, -1, 0, 31, -1])
    kc, vc = torch.zeros(32, 3, 16, dtype=dtype), torch.zeros(32, 3, 16, dtype=dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    tk.store_kv(k, v, kc, vc, slots)
    ref.store_kv(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(kc[31], k[3]) and int((kc.abs().sum((1, 2)) > 0).sum()) == 3


# ---- wrappers ------------------------------------------------------------------------------

def test_wrapper_errors_name_the_argument():
    k, v, table, seq_lens = paged_kv([5], 4, 2, 16, torch.float32)
    q = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="page_table"):
        tk.decode_attention(q, k, v, table.long(), seq_lens, 4, 1.0)
    with pytest.raises(ValueError, match="k_cache"):
        tk.decode_attention(q, k.half(), v, table, seq_lens, 4, 1.0)
    with pytest.raises(ValueError, match="KV heads"):
        tk.decode_attention(torch.randn(1, 3, 16), k, v, table, seq_lens, 4, 1.0)
    with pytest.raises(ValueError, match="page_size"):
        tk.decode_attention(q, k, v, table, seq_lens, 0, 1.0)
    with pytest.raises(ValueError, match="q_start"):
        tk.extend_attention(q, k, v, table, torch.zeros(3, dtype=torch.int32), seq_lens - 1, seq_lens, 4, 1.0, 1)
    with pytest.raises(ValueError, match="slots"):
        tk.store_kv(k[:2], v[:2], k, v, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="residual"):
        tk.fused_add_rmsnorm(torch.randn(2, 8), torch.randn(2, 4), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        tk.fused_add_rmsnorm(torch.randn(8, 2).t(), None, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="gate_up.*even"):
        tk.silu_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="gate_up"):
        tk.silu_mul(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="w has shape"):
        tk.gemv(torch.randn(2, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="bias"):
        tk.gemv(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


def test_reference_import_does_not_load_kernels():
    """The triton backend's CPU fallback imports kernels.triton.reference only: no Triton,
    no kernel decorated (else TRITON_INTERPRET would be fixed too early for these tests)."""
    code = ("import sys, kernels.triton.reference; "
            "assert 'triton' not in sys.modules and 'kernels.triton.decode' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
