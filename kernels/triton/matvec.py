"""Matrix-vector product for batch-1 decode: y = x @ W^T (+ b), x one row.

A batch-1 decode step is bound by reading the weights from HBM. For one row
cuBLAS picks kernels that reach 56-87% of the read bandwidth on Llama-3.1-8B's
matmuls (split-K with a separate reduce for o_proj and down); here each program
reads BLOCK_N whole rows of W in BLOCK_K chunks, FMAs them against x (from L2)
into a [BLOCK_N, BLOCK_K] fp32 accumulator and reduces it once at the end:
72-100% on the same matmuls, replayed in a CUDA graph, and faster than cuBLAS on
every matmul of the 1B and 0.5B shapes but the 0.5B's lm_head (5% slower)
(benchmarks/micro/gpu_gemv.py, benchmarks/results/gpu_h200.md).

More rows work (one program per row and block of W) but each row reads W again:
at 4 rows cuBLAS's tiled kernels are twice as fast, so layers.py uses this for
one row only. Fusing the RMSNorm or silu_mul before it into every program was
measured too, and lost on the 8B shapes: each program recomputes the input.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, interpreting

# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()


@triton.jit
def _gemv_kernel(X, W, B, Y, M, N, K, stride_x, stride_w, stride_y,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    m = pid % M
    rn = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w = tl.load(W + rn[:, None].to(tl.int64) * stride_w + rk[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(X + m * stride_x + rk, mask=k_ok, other=0.0)
        acc += x.to(tl.float32)[None, :] * w.to(tl.float32)
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_y + rn, y.to(Y.dtype.element_ty), mask=n_ok)


def _config(K: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), from the H200 sweep of gpu_gemv.py: 2 x 1024 was
    best or within 2% on every matmul of the 0.5B and 1B shapes, 4 x 2048 on the 8B's (K >= 4096)."""
    if K >= 4096:
        return 4, 2048, 4, 2
    return 2, min(1024, triton.next_power_of_2(K)), 4, 2


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ bias [N]): a new [M, N] tensor in x's dtype (fast for M = 1)."""
    check("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_device("x", x, INTERPRET)
    M, K = x.shape
    check("w", w, ndim=2, dtypes=(x.dtype,), shape=(None, K), device=x.device)
    N = w.shape[0]
    if bias is not None:
        check("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(N,), device=x.device)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    block_n, block_k, warps, stages = config or _config(K)
    _gemv_kernel[(triton.cdiv(N, block_n) * M,)](
        x, w, w if bias is None else bias, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y
