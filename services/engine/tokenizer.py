"""The tokenizer moved to services.common.tokenizer (the gateway shares it, without torch)."""
from services.common.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
