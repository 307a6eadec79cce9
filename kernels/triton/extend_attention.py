"""Placeholder: the torch reference until the Triton kernel lands."""
from .reference import extend_attention  # noqa: F401
