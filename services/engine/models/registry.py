"""Model families by name (ModelConfig.family -> nn.Module class)."""
from __future__ import annotations

from typing import Callable

MODELS: dict[str, type] = {}


def register_model(family: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        MODELS[family] = cls
        return cls
    return deco


def get_model_class(family: str) -> type:
    from . import llama, qwen  # noqa: F401  (register the families)
    if family not in MODELS:
        raise ValueError(f"model family {family!r} is not supported (supported: {sorted(MODELS)})")
    return MODELS[family]
