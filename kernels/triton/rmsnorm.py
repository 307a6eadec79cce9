"""Placeholder: the torch reference until the Triton kernel lands."""
from .reference import fused_add_rmsnorm  # noqa: F401
