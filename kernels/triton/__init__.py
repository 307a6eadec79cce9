"""Triton GPU kernels: paged attention (decode, extend), fused add+RMSNorm, rotary, KV store,
silu(gate) * up, and a matrix-vector product for batch-1 decode (gemv).

Each public op is a thin wrapper that checks shapes, dtypes, strides and
devices, naming the argument, then launches the kernel (decode.py, extend.py,
rmsnorm.py, rope.py, kv_store.py, activation.py, matvec.py: module names differ from the
ops' so that a submodule import never shadows an op); reference.py holds the torch reference
of each, with the same signature. Everything here is CUDA-graph capturable: no host syncs, and grids
depend only on shapes and Python ints.

The kernel modules are imported lazily, on first use of a name, so that
importing `kernels.triton.reference` (the CPU fallback of the triton attention
backend) neither imports Triton nor JIT-decorates any kernel. Under
TRITON_INTERPRET=1 the kernels run on CPU tensors (Triton's interpreter). Triton
reads that variable when a function is decorated: its own library (tl.max, ...)
at `import triton`, ours when their module is first imported here. So it must
be set before triton is imported in the process, and stay set while kernels
run; `reload_kernels()` re-decorates ours, `interpreted()` says how they were.
tests/unit/test_triton_kernels.py shows the sequence.
"""
from __future__ import annotations

import importlib
import sys

_MODULE_OF = {
    "decode_attention": "decode",
    "extend_attention": "extend",
    "fused_add_rmsnorm": "rmsnorm",
    "rope_cos_sin_cache": "rope",
    "apply_rope_": "rope",
    "store_kv": "kv_store",
    "silu_mul": "activation",
    "gemv": "matvec",
}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = fn             # later lookups skip this function
    return fn


def __dir__():
    return sorted(list(globals()) + __all__)


def reload_kernels() -> None:
    """Forget the imported kernel modules: the next use imports (and decorates) them again,
    under the TRITON_INTERPRET of that moment."""
    for mod in set(_MODULE_OF.values()):
        sys.modules.pop(f"{__name__}.{mod}", None)
    for name in __all__:
        globals().pop(name, None)


def interpreted() -> bool | None:
    """Whether the loaded kernels run under Triton's interpreter (None: none loaded yet)."""
    mod = sys.modules.get(f"{__name__}.decode")
    return None if mod is None else mod.INTERPRET
