"""Argument checks shared by the wrappers, and the few launch facts they need."""
from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): CPU tensors are allowed."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(name: str, t, *, ndim: int, dtypes=None, shape=None, device=None,
          last_contiguous: bool = True) -> None:
    """Raise ValueError naming `name` unless t is a tensor of that rank/dtype/shape/device
    whose last dimension is contiguous (shape entries of None are free)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; dimension {i} must be {want}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the first argument)")
    if last_contiguous and t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (strides {t.stride()})")


def check_device(name: str, t: torch.Tensor, interpret: bool) -> None:
    if t.device.type != "cuda" and not interpret:
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 for CPU tensors)")


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
    return value


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a fixed 8 under the interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
