"""Triton GPU kernels: paged attention (decode, extend), fused add+RMSNorm, rotary, KV store.

Each public op is a thin wrapper (kernels/triton/<op>.py) that checks shapes,
dtypes, strides and devices, naming the argument, then launches the kernel;
kernels/triton/reference.py holds the torch reference of each, with the same
signature. Everything here is CUDA-graph capturable: no host syncs, and grids
depend only on shapes and Python ints.

The kernel modules are imported lazily, on first use of a name, so that
importing `kernels.triton.reference` (the CPU fallback of the triton attention
backend) neither imports Triton nor JIT-decorates any kernel. Under
TRITON_INTERPRET=1 the kernels run on CPU tensors (Triton's interpreter); the
variable is read when a kernel is decorated, i.e. at that first use, so it must
be set before then (tests/unit/test_triton_kernels.py does so at import).
"""
from __future__ import annotations

import importlib

_MODULE_OF = {
    "decode_attention": "decode_attention",
    "extend_attention": "extend_attention",
    "fused_add_rmsnorm": "rmsnorm",
    "rope_cos_sin_cache": "rope",
    "apply_rope_": "rope",
    "store_kv": "store_kv",
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
