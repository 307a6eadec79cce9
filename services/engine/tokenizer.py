"""Tokenizer and incremental detokenizer.

Tokenizer wraps a Hugging Face fast tokenizer loaded from a model folder.
IncrementalDetokenizer turns a stream of token ids into text pieces whose
concatenation is exactly Tokenizer.decode(all ids), decoding only a short window
of recent ids per step (the prefix/read offsets of vLLM and SGLang).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

_REPLACEMENT = "\ufffd"   # what a byte sequence cut in the middle of a character decodes to


class Tokenizer:
    def __init__(self, hf: Any, generation_eos: Sequence[int] = ()):
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{type(hf).__name__} is not a fast tokenizer (a tokenizer.json is needed)")
        self.hf = hf
        self._backend = hf.backend_tokenizer
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *generation_eos]))

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        from transformers import AutoTokenizer
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json")
        hf = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
        return cls(hf, _generation_eos(path / "generation_config.json"))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # The Rust decoder, without transformers' clean_up_tokenization_spaces: that
        # rewrite (" ." -> ".") looks across token boundaries, so a stream of pieces
        # could never add up to it. Streaming and final text use this one function.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError(f"model {self.hf.name_or_path!r} has no chat template: "
                             f"send a plain prompt (completions), not chat messages")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False)
        # The template writes its special tokens itself (as transformers does when it
        # tokenizes a rendered template): a BOS added here would be a second one.
        return self.encode(text, add_special_tokens=False)


def _generation_eos(file: Path) -> list[int]:
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


class IncrementalDetokenizer:
    """Text of a growing token sequence, piece by piece.

    Invariant: emitted text == decode(ids[:read_offset]), and ids[:prefix_offset]
    ends on a character boundary. Each add() decodes ids[prefix_offset:] twice (with
    and without the new ids) and emits the difference; the tokens before
    prefix_offset are never decoded again, so a step costs O(window), not O(n).
    The window keeps the last emitted tokens as context, because some decoders
    treat the first token of a decode specially (sentencepiece drops its leading
    space) and that must happen in both decodes alike.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> str:
        """The new text; '' while the newest bytes are an incomplete character."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        # Held back: a character split across tokens decodes to U+FFFD until its
        # last byte arrives. (flush() lets out one that never completes.)
        if new_text.endswith(_REPLACEMENT) or len(new_text) <= len(prefix_text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back, as decode() renders it; call at the end."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]
