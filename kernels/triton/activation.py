"""silu(gate) * up over a fused gate_up projection, one kernel.

Rounding order is torch's `F.silu(gate) * up` in services/engine/layers.py:
silu in fp32, rounded to the input dtype, then the product in fp32, rounded
again. The same values as the two torch kernels it replaces, with one read of
gate_up and one write of the result instead of three reads and two writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, interpreting

# Decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRET = interpreting()
BLOCK = 1024


@triton.jit
def _silu_mul_kernel(GU, O, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + inter + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(O.dtype.element_ty).to(tl.float32)
    tl.store(O + row * stride_o + cols, (s * u).to(O.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] for gate_up [T, 2I]: a new [T, I] tensor."""
    check("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES)
    check_device("gate_up", gate_up, INTERPRET)
    T, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"gate_up: the last dimension ({two_i}) must be even (gate, then up)")
    inter = two_i // 2
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or inter == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(inter))
    _silu_mul_kernel[(T, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                      BLOCK=block, num_warps=4)
    return out
