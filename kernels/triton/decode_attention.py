"""Placeholder: the torch reference until the Triton kernel lands."""
from .reference import decode_attention  # noqa: F401
