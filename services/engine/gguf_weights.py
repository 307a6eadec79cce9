"""Decode matmuls on the GGUF's own blocks (CPU, fp32, models converted from a GGUF).

A model converted from a GGUF (gguf_convert.py) holds the dequantized blocks
in fp32: 32 bits for what the file stores in 5 (Q4_1) or 8.5 (Q8_0). Decode
steps read every weight once, so on CPU they are bound by those bytes. The
converter keeps the raw blocks beside the fp32 copy (gguf_blocks/);
this module hands each Linear (and a tied lm_head) its blocks as a
QuantWeight, which kernels/cpu/quant multiplies with weights bit-identical to
the fp32 ones: the same model, a fraction of the traffic. Prefill chunks keep
the fp32 weights (layers.linear picks by the token count).
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from kernels.cpu import quant

from .gguf_convert import BLOCKS_FILE
from .loader import ModelSource

log = logging.getLogger("tandem.engine")


def iter_quant_weights(source: ModelSource) -> Iterator[tuple[str, quant.QuantWeight]]:
    """(HF name, QuantWeight) of every weight whose blocks the kernels read."""
    from safetensors import safe_open
    path = source.path / BLOCKS_FILE if source.path is not None else None
    if path is None or not path.is_file():
        return
    with safe_open(str(path), framework="numpy") as f:
        types = f.metadata() or {}
        for name in f.keys():
            blocks = f.get_tensor(name)
            ggml_type = int(types.get(name, -1))
            n, k = blocks.shape[0], _row_len(ggml_type, blocks.shape[1])
            if k and quant.supported(ggml_type, n, k):
                yield name, quant.pack(blocks, ggml_type, n, k)


def _row_len(ggml_type: int, row_bytes: int) -> int:
    """k of a row of this many bytes of this type (0 when the kernels do not read it)."""
    spec = quant.GGML_TYPES.get(ggml_type)
    return row_bytes // spec[2] * quant.BLOCK if spec and row_bytes % spec[2] == 0 else 0


def attach(model: torch.nn.Module, source: ModelSource, dtype: torch.dtype, device: torch.device) -> int:
    """Give the model's matmuls their GGUF blocks where that applies; how many it got."""
    if (device.type != "cpu" or dtype != torch.float32 or source.load_format != "hf"
            or not hasattr(model, "attach_quant") or not quant.available()):
        return 0
    n = model.attach_quant(iter_quant_weights(source))
    if n:
        log.info("decode matmuls read %d weights as GGUF blocks", n)
    return n
