"""CPU kernels (C++ with AVX-512 or AVX2), built once on first use and cached.

One extension, built for what the CPU has: with AVX-512 BF16 everything
(packed bf16 matmuls, the fused decode layer); with AVX2 + FMA + F16C all but
the bf16 matmuls (simd.h gives the shared kernels one vector type for both).
The fp32 matmuls on GGUF blocks (quant.py, qgemv.cpp) are AVX2 code in both.
The build needs a C++ compiler and ninja (installed with the project); it
lands in $TANDEM_CACHE_DIR/torch_extensions (default ~/.cache/tandem/...).
Where the CPU has neither or the build fails, `available()` is False and
callers keep to the torch ops.
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("tandem.kernels.cpu")
_SRCS = [Path(__file__).with_name(n) for n in ("bindings.cpp", "gemv_bf16.cpp", "decode_attention.cpp", "elementwise.cpp",
                                                "decode_layer.cpp", "qgemv.cpp")]
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
# flavor -> (CPU flags it needs, compiler flags)
_FLAVORS = {"avx512bf16": ({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2", "fma", "f16c"},
                           ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", *_AVX2]),
            "avx2": ({"avx2", "fma", "f16c"}, _AVX2)}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[-1].split())


def _build_dir() -> Path:
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.expanduser("~/.cache/tandem")
    d = Path(root) / "torch_extensions" / f"torch{torch.__version__.replace('+', '_')}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _build_lock(d: Path):
    """One build at a time in d, across processes, by a lock the kernel drops when its
    holder dies. torch's own lock (a `lock` file it creates and deletes) outlives a build
    that was killed, and every later load would wait on it forever; holding this one, no
    other build runs, so a `lock` file left there is stale and goes."""
    with open(d / "tandem-build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = d / "lock"
        if stale.exists():
            log.warning("removing %s, left by a CPU-kernel build that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield


@lru_cache(maxsize=1)
def flavor() -> str | None:
    """The build this CPU runs: 'avx512bf16', 'avx2', or None (TANDEM_CPU_KERNELS=0 forces None)."""
    if os.environ.get("TANDEM_CPU_KERNELS", "1") == "0":
        return None
    return next((name for name, (need, _) in _FLAVORS.items() if need <= cpu_flags()), None)


@lru_cache(maxsize=1)
def _ext():
    if flavor() is None:
        return None
    try:
        from torch.utils.cpp_extension import load
        log.info("building CPU kernels for %s (once; cached in %s)", flavor(), _build_dir())
        with _build_lock(_build_dir()):
            return load(name=f"tandem_cpu_kernels_{flavor()}", sources=[str(p) for p in _SRCS],
                        build_directory=str(_build_dir()),
                        # -fopenmp compiles at::parallel_for's pragmas; the GOMP symbols are
                        # left to resolve against torch's own libgomp (already loaded
                        # globally), so the kernels share torch's thread pool.
                        extra_cflags=["-O3", *_FLAVORS[flavor()][1], "-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, an old assembler: keep to torch ops
        log.warning("CPU kernels unavailable (%s); using torch ops", str(e).splitlines()[0] if str(e) else e)
        return None


def available() -> bool:
    return _ext() is not None


def has_bf16_gemv() -> bool:
    return flavor() == "avx512bf16" and available()


def can_pack(w: torch.Tensor) -> bool:
    return (has_bf16_gemv() and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2
            and w.shape[0] % 16 == 0 and w.shape[1] % 2 == 0)


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """The layout gemv_bf16 reads, for every M: panels of 48 output columns, each
    [K/2, 48, 2] (the last one narrower); the tensor's shape [N/16, 16 K] only carries N and K."""
    return _ext().pack_bf16(w)


def gemv_bf16(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W[N, K]^T for small M (register tiles of 8 tokens x 48 columns) with W
    packed by pack_bf16; bf16 in and out, fp32 accumulation."""
    return _ext().gemv_bf16(x, packed)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence over its paged K/V: q [B, H, D], k/v [S, KVH, D],
    slots [B, L] int64 (padded), lens [B] int64 -> [B, H, D]."""
    return _ext().decode_attention(q, k, v, slots, lens, scale)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual); residual None means x alone."""
    out, res = _ext().add_rmsnorm(x, residual, weight, eps)
    return out, res


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """Rotary embedding in place on x [T, heads, d] (rows contiguous)."""
    _ext().rope_(x, positions, cos, sin_signed)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _ext().silu_mul(gate_up)


def decode_layer(x: torch.Tensor, residual: torch.Tensor | None, weights: list[torch.Tensor],
                 qkv_bias: torch.Tensor | None, cache: list[torch.Tensor], heads: int, kv_heads: int,
                 eps: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole Llama-family decoder layer for a bf16 decode step (see decode_layer.cpp)."""
    out, res = _ext().decode_layer(x, residual, weights, qkv_bias, cache, heads, kv_heads, eps, scale)
    return out, res
