"""Matmul for a few rows (decode at small batch): y = prologue(x) @ W^T (+ b).

At batch 1-8 a decode step's matmuls are bound by reading W from HBM. cuBLAS
picks split-K kernels with a separate reduce for some of these shapes, and the
norm and activation before each matmul are kernels of their own, each a few
microseconds of launch gap in the graph. Here a program reads BLOCK_N whole rows
of W against one row of x (the programs of the x rows sharing a block of W run
side by side, so W comes from HBM about once for all of them), and the input of
the matmul can be computed on the fly from what the separate kernel would have
read:

- PROLOGUE_NONE:    x as given.
- PROLOGUE_SILU:    x = silu(gate) * up of a gate_up [M, 2K] (the activation's rounding,
                    activation.py), so the down projection reads gate_up directly.
- PROLOGUE_RMSNORM: x = rmsnorm(x + residual) (rmsnorm.py's rounding); every program
                    takes its row's sum of squares in a first pass over x (from L2);
                    the programs of W's first block write the new residual.

The input values are bit for bit what the separate kernels produce; only the
order of the fp32 sums over K differs from cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, interpreting

# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()
MAX_ROWS = 8                          # beyond this cuBLAS's tiled GEMMs are the better choice
PROLOGUE_NONE, PROLOGUE_SILU, PROLOGUE_RMSNORM = 0, 1, 2


@triton.jit
def _prologue(X, R, NW, rk, k_ok, K, inv, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The row's [BLOCK_K] input chunk in fp32, rounded as the separate kernel would."""
    if PROLOGUE == 1:
        g = tl.load(X + rk, mask=k_ok, other=0.0).to(tl.float32)
        u = tl.load(X + K + rk, mask=k_ok, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)
        return (s * u).to(X.dtype.element_ty).to(tl.float32)
    x = tl.load(X + rk, mask=k_ok, other=0.0)
    if PROLOGUE == 2:
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(R + rk, mask=k_ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        normed = (x.to(tl.float32) * inv).to(X.dtype.element_ty).to(tl.float32)
        x = (normed * tl.load(NW + rk, mask=k_ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(X, R, NW, W, B, Y, RO, M, N, K, stride_x, stride_r, stride_w, stride_y, stride_ro, eps,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Row m of x against BLOCK_N rows of W. The M programs of one W block are adjacent in the
    # launch order, so they run together and all but the first read the block from L2.
    pid = tl.program_id(0)
    m = pid % M
    rn = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    X += m * stride_x
    R += m * stride_r
    inv = 0.0
    if PROLOGUE == 2:                  # the row's sum of squares of x + residual; block 0 writes the sum
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(X + rk, mask=k_ok, other=0.0)
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + tl.load(R + rk, mask=k_ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
                if pid < M:
                    tl.store(RO + m * stride_ro + rk, x, mask=k_ok)
            xf = x.to(tl.float32)
            ss += xf * xf
        inv = tl.math.rsqrt(tl.sum(ss, 0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)       # FMAs, reduced once at the end
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w = tl.load(W + rn[:, None].to(tl.int64) * stride_w + rk[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = _prologue(X, R, NW, rk, k_ok, K, inv, PROLOGUE, HAS_RESIDUAL)
        acc += x[None, :] * w.to(tl.float32)
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_y + rn, y.to(Y.dtype.element_ty), mask=n_ok)


def _config(M: int, N: int, K: int, prologue: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), tuned on an H200 (benchmarks/micro/gpu_gemv.py):
    2 x 1024 was the best plain gemv for every matmul of the 0.5B, 1B and 8B shapes, 3-43% faster
    than cuBLAS. A prologue recomputes the input in every program, so it takes wider blocks."""
    block_n = 2 if prologue == PROLOGUE_NONE else 8
    return block_n, min(1024, triton.next_power_of_2(K)), 4, 2


def _launch(x, w, bias, prologue, K, residual=None, norm_weight=None, eps=0.0, config=None):
    M = x.shape[0]
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    r_out = torch.empty(M, K, dtype=x.dtype, device=x.device) if residual is not None else None
    if M == 0 or N == 0:
        return y, r_out
    block_n, block_k, warps, stages = config or _config(M, N, K, prologue)
    _gemv_kernel[(triton.cdiv(N, block_n) * M,)](
        x, x if residual is None else residual, x if norm_weight is None else norm_weight, w,
        w if bias is None else bias, y, y if r_out is None else r_out,
        M, N, K, x.stride(0), 0 if residual is None else residual.stride(0), w.stride(0), y.stride(0),
        0 if r_out is None else r_out.stride(0), float(eps),
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y, r_out


def _check(x, w, bias, k_of_x):
    check("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_device("x", x, INTERPRET)
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"x has {x.shape[0]} rows; gemv takes at most {MAX_ROWS} (use a GEMM)")
    check("w", w, ndim=2, dtypes=(x.dtype,), shape=(None, k_of_x), device=x.device)
    if bias is not None:
        check("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(w.shape[0],), device=x.device)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T (+ bias) for M <= MAX_ROWS: a new [M, N] tensor in x's dtype."""
    _check(x, w, bias, x.shape[1] if x.dim() == 2 else None)
    return _launch(x, w, bias, PROLOGUE_NONE, x.shape[1], config=config)[0]


def silu_mul_gemv(gate_up: torch.Tensor, w: torch.Tensor, config=None) -> torch.Tensor:
    """silu_mul(gate_up) @ w^T for gate_up [M, 2K], w [N, K], without materializing silu_mul."""
    check("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up: the last dimension ({gate_up.shape[1]}) must be even (gate, then up)")
    K = gate_up.shape[1] // 2
    _check(gate_up, w, None, K)
    return _launch(gate_up, w, None, PROLOGUE_SILU, K, config=config)[0]


def add_rmsnorm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     w: torch.Tensor, bias: torch.Tensor | None = None, config=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) @ w^T (+ bias), x + residual) as fused_add_rmsnorm then gemv would give;
    residual None: the first layer, the residual out is x itself."""
    _check(x, w, bias, x.shape[1] if x.dim() == 2 else None)
    K = x.shape[1]
    if residual is not None:
        check("residual", residual, ndim=2, dtypes=FLOAT_DTYPES, shape=tuple(x.shape), device=x.device)
    check("norm_weight", norm_weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(K,), device=x.device)
    y, r_out = _launch(x, w, bias, PROLOGUE_RMSNORM, K, residual, norm_weight, eps, config=config)
    return y, x if r_out is None else r_out
