"""Placeholder: the torch reference until the Triton kernel lands."""
from .reference import store_kv  # noqa: F401
