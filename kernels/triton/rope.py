"""Placeholder: the torch reference until the Triton kernel lands."""
from .reference import apply_rope_, rope_cos_sin_cache  # noqa: F401
