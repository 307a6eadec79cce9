"""Tokenizer and incremental detokenizer, on the `tokenizers` library and jinja2 only.

The gateway tokenizes and detokenizes too, and it must never import torch (nor
transformers, which imports torch and takes seconds). It has no model files
either: a worker ships the tokenizer as the strings of tokenizer.json,
tokenizer_config.json and generation_config.json (Tokenizer.from_strings;
the attributes of the same names hold them).

Tokenizer reads those files the way transformers' fast tokenizer does, for what
matters to serving: encode, decode, the chat template, the eos ids.
IncrementalDetokenizer turns a stream of token ids into text pieces whose
concatenation is exactly Tokenizer.decode(all ids), decoding only a short window
of recent ids per step (the prefix/read offsets of vLLM and SGLang).
"""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as RustTokenizer

_REPLACEMENT = "\ufffd"   # what a byte sequence cut in the middle of a character decodes to

# The named special tokens a chat template sees (transformers' special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Where a message's reasoning may come under; templates read the first (transformers aliases them alike).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A tokenizer.json (Rust `tokenizers`) plus what tokenizer_config.json and
    generation_config.json add to it: special tokens, the chat template, eos ids."""

    def __init__(self, tokenizer_json: str, tokenizer_config_json: str = "{}",
                 generation_config_json: str = "{}", name: str = ""):
        self.tokenizer_json = tokenizer_json
        self.tokenizer_config_json = tokenizer_config_json
        self.generation_config_json = generation_config_json
        self.name = name
        what = f"{name}: " if name else ""
        try:
            self.backend = RustTokenizer.from_str(tokenizer_json)
        except Exception as e:   # the Rust side raises a bare Exception
            raise ValueError(f"{what}tokenizer.json is not a valid tokenizer: {e}") from None
        try:
            config = json.loads(tokenizer_config_json or "{}")
        except ValueError as e:
            raise ValueError(f"{what}tokenizer_config.json is not JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{what}tokenizer_config.json is not a JSON object")
        # As transformers encodes: no truncation, no padding (whatever tokenizer.json says), and
        # special-token text is one special token unless the config sets split_special_tokens.
        # What encode(add_special_tokens=True) adds (a BOS...) is tokenizer.json's post-processor,
        # as in transformers 5, which ignores the config's add_bos_token/add_eos_token whenever a
        # tokenizer.json exists (Llama 3 and the converted GGUF models keep their BOS logic there).
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        # Strings, or AddedToken dicts {"content": ..., ...}.
        self.special_tokens: dict[str, str] = {
            key: tok for key in SPECIAL_TOKEN_NAMES if (tok := _token_content(config.get(key))) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.chat_template: str | dict[str, str] | None = _chat_templates(config.get("chat_template"))

        eos = self.backend.token_to_id(self.eos_token) if self.eos_token is not None else None
        eos_ids = [eos] if eos is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys([*eos_ids, *_generation_eos(generation_config_json)]))
        self._byte_pieces: dict[bool, list[bytes] | None] = {}

    @classmethod
    def from_strings(cls, tokenizer_json: str, tokenizer_config_json: str = "{}",
                     generation_config_json: str = "{}", name: str = "") -> "Tokenizer":
        return cls(tokenizer_json, tokenizer_config_json, generation_config_json, name)

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json (required), tokenizer_config.json, generation_config.json and,
        as transformers reads it, a chat_template.jinja file (it wins over the config's
        template; it is folded into .tokenizer_config_json so that the strings carry it)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json")

        def read(name: str) -> str | None:
            file = path / name
            return file.read_text(encoding="utf-8") if file.is_file() else None

        config = read("tokenizer_config.json") or "{}"
        template = read("chat_template.jinja")
        if template is not None:
            try:
                cfg = json.loads(config)
            except ValueError as e:
                raise ValueError(f"{path / 'tokenizer_config.json'} is not JSON: {e}") from None
            config = json.dumps({**cfg, "chat_template": template}, ensure_ascii=False)
        return cls(read("tokenizer.json") or "", config, read("generation_config.json") or "{}", str(path))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # The Rust decoder, without transformers' clean_up_tokenization_spaces: that
        # rewrite (" ." -> ".") looks across token boundaries, so a stream of pieces
        # could never add up to it. Streaming and final text use this one function.
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def byte_pieces(self, skip_special_tokens: bool = False) -> list[bytes] | None:
        """Each id's bytes, when decode(ids) is b"".join(their bytes).decode("utf-8",
        "replace") (a GPT-2 byte-level decoder and nothing else); else None.
        Checked against decode() over the whole vocabulary once per flag."""
        key = bool(skip_special_tokens)
        if key not in self._byte_pieces:
            self._byte_pieces[key] = _byte_pieces(self, key)
        return self._byte_pieces[key]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None, documents: list[dict] | None = None,
                    **kwargs: Any) -> str:
        """The chat template's text, as transformers renders it (apply_chat_template(tokenize=False))."""
        template = self._template(tools)
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if not all(isinstance(m, dict) for m in messages):
            raise TypeError("chat messages must be dicts")
        # As transformers: keys whose value is None are dropped (OpenAI clients send
        # content=None, tool_calls=None; templates handle a missing key, not a None).
        msgs = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        variables = {**self.special_tokens, **kwargs}   # kwargs win, as in transformers
        return _compile(template).render(messages=msgs, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            **kwargs: Any) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools=tools, documents=documents, **kwargs)
        # The template writes its special tokens itself (as transformers does when it
        # tokenizes a rendered template): a BOS added here would be a second one.
        return self.encode(text, add_special_tokens=False)

    def _template(self, tools: list[dict] | None) -> str:
        t = self.chat_template
        if isinstance(t, dict):   # named templates: transformers picks tool_use for tools, else default
            t = t.get("tool_use") if tools is not None and "tool_use" in t else t.get("default")
        if not t:
            raise ValueError(f"model {self.name!r} has no chat template: "
                             f"send a plain prompt (completions), not chat messages")
        return t


@lru_cache(maxsize=1)
def _gpt2_byte_table() -> dict[int, str]:
    """str.translate table from GPT-2's byte-level alphabet (a printable character for each
    byte) to the byte as a latin-1 character; any other character below U+0144 goes to
    U+FFFF, which latin-1 cannot encode, as does every character above."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {cp: "\uffff" for cp in range(256 + 68)}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[256 + extra] = chr(b)
            extra += 1
    return table


def _byte_pieces(tok: Tokenizer, skip_special_tokens: bool) -> list[bytes] | None:
    try:
        return _build_byte_pieces(tok, skip_special_tokens)
    except Exception:                              # an odd vocabulary: the window path, never a failed load
        return None


def _build_byte_pieces(tok: Tokenizer, skip_special_tokens: bool) -> list[bytes] | None:
    backend = tok.backend
    if type(backend.decoder).__name__ != "ByteLevel":
        return None
    if skip_special_tokens:                        # the full table, special tokens emptied
        full = tok.byte_pieces(False)
        if full is None:
            return None
        pieces = list(full)
        for i, added in backend.get_added_tokens_decoder().items():
            if added.special:
                pieces[i] = b""
    else:
        table = _gpt2_byte_table()
        vocab = backend.get_vocab(with_added_tokens=True)
        pieces = [b""] * (max(vocab.values(), default=-1) + 1)     # ids may have gaps
        for t, i in vocab.items():
            try:                                   # as the ByteLevel decoder maps a token ...
                pieces[i] = t.translate(table).encode("latin-1")
            except UnicodeEncodeError:             # ... or, with a character outside it, keeps it
                pieces[i] = t.encode()
    step = 512                                     # the proof: the whole vocabulary decodes alike
    for start in range(0, len(pieces), step):
        ids = list(range(start, min(start + step, len(pieces))))
        if b"".join(pieces[i] for i in ids).decode("utf-8", "replace") != tok.decode(ids, skip_special_tokens):
            return None
    return pieces


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):   # an AddedToken as transformers serializes it
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _chat_templates(value: Any) -> str | dict[str, str] | None:
    """One template, or named ones (a list of {"name", "template"} in the config)."""
    if isinstance(value, list):
        value = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t}
    return value or None


def _generation_eos(generation_config_json: str) -> list[int]:
    try:
        eos = json.loads(generation_config_json or "{}").get("eos_token_id")
    except (ValueError, AttributeError):
        return []
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=16)
def _compile(template: str):
    """The template in a jinja2 environment like transformers' (chat templates are
    untrusted code from the Hub: an immutable sandbox)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} (training templates mark the assistant's
        tokens with it): rendered as its body, as transformers does when it tracks nothing."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # not jinja's own tojson, which escapes HTML characters (<, >, &, ')
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:   # dict(...) and dict.fromkeys(...), without the type object itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):   # no underscore attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r}: no underscore names")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=Namespace)
    return env.from_string(template)


class IncrementalDetokenizer:
    """Text of a growing token sequence, piece by piece.

    Byte-level tokenizers (Tokenizer.byte_pieces): each id's bytes go through an
    incremental UTF-8 decoder, which holds back a character's first bytes.
    Others, the window below. Invariant of the window: emitted text ==
    decode(ids[:read_offset]), and ids[:prefix_offset]
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
        byte_pieces = getattr(tokenizer, "byte_pieces", None)     # None: a stand-in with decode() only
        self._pieces = byte_pieces(skip_special_tokens) if byte_pieces is not None else None
        if self._pieces is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> str:
        """The new text; '' while the newest bytes are an incomplete character."""
        pieces = self._pieces
        if pieces is not None:
            n = len(pieces)
            return self._utf8.decode(b"".join([pieces[i] if 0 <= i < n else b"" for i in token_ids]))
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
        if self._pieces is not None:
            return self._utf8.decode(b"", final=True)
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]
