"""Tokenizer of the converted default model, and the incremental detokenizer (CPU, no network)."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from services.engine.loader import resolve_model
from services.engine.model_registry import DEFAULT_MODEL, KNOWN_MODELS
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow\n",
    "Pi is 3.14159; 1,000,000 > 999 and 2024-06-01T12:00:00Z",
    "你好，世界！这是一个测试。机器学习很有趣。",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 👨‍👩‍👧",
    "  leading and trailing  \t\ttabs\r\nand newlines\n\n",
    "I'm sure they'll say it's fine, don't you think?",
    "Ünïcödé: Café naïve résumé ß Ωμέγα Россия مرحبا",
    "<|im_start|>user\nHi there<|im_end|>\n",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def folder(cache_dir):
    return resolve_model(DEFAULT_MODEL).path


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_folder(folder)


def test_special_tokens_match_the_original_model(tok):
    hf = tok.hf
    assert (hf.bos_token, hf.bos_token_id) == ("<|im_start|>", 1)
    assert (hf.eos_token, hf.eos_token_id) == ("<|im_end|>", 2)
    assert (hf.pad_token_id, hf.unk_token, hf.unk_token_id) == (2, "<|endoftext|>", 0)
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)   # no BOS added
    assert tok.encode("<|im_start|>user")[0] == 1   # special tokens stay whole
    assert tok.eos_token_ids == (2,) and tok.vocab_size == 49152


def test_matches_transformers_gguf_tokenizer(tok):
    from transformers import AutoTokenizer
    gguf = KNOWN_MODELS[DEFAULT_MODEL].gguf_path()
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_numbers_are_split_one_by_one(tok):
    """llama.cpp's `smollm` pre-tokenizer and SmolLM2's tokenizer.json both isolate every
    \\p{N} character before the GPT-2 regex. transformers' GGUF loader ignores `smollm`
    and differs on non-ASCII numerals: there " ①" merges its space into "Ġâ"."""
    assert tok.hf.convert_ids_to_tokens(tok.encode(" ①"))[0] == "Ġ"
    assert tok.hf.convert_ids_to_tokens(tok.encode("x 2024")) == ["x", "Ġ", "2", "0", "2", "4"]


def test_chat_template(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}])
    assert tok.decode(ids) == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
                               "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 1 and ids.count(1) == 3   # one <|im_start|> a message, no extra BOS
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi!"}], add_generation_prompt=False)
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"


def test_no_chat_template_is_a_clear_error(folder, tmp_path):
    shutil.copy(folder / "tokenizer.json", tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = Tokenizer.from_folder(tmp_path)
    assert plain.eos_token_ids == (2,)   # no generation_config.json: the tokenizer's eos
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "Hi"}])


def _stream(tok, ids, chunk=1, skip=False):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [detok.flush()]


@pytest.mark.parametrize("text", [TEXTS[3], TEXTS[4], "混合 mixed 文本 🎉🎉 with 数字 42 and 👩‍💻!"])
def test_detokenizer_token_by_token(tok, text):
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]   # some character did span tokens and was held back


def test_detokenizer_skips_special_tokens(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "你好 😀"}])
    for skip in (False, True):
        assert "".join(_stream(tok, ids, skip=skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_flushes_an_incomplete_character(tok):
    ids = tok.encode("ok 😀")[:-1]   # the emoji's last byte never comes
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and pieces[-1].endswith("\ufffd")
    assert not any("\ufffd" in p for p in pieces[:-1])


def test_detokenizer_decodes_a_small_window(tok):
    windows = []
    decode = tok.decode
    class Spy:
        def decode(self, ids, skip_special_tokens=False):
            windows.append(len(ids))
            return decode(ids, skip_special_tokens)
    ids = tok.encode((TEXTS[0] + TEXTS[3] + TEXTS[4]) * 30)
    detok = IncrementalDetokenizer(Spy())
    text = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids) and len(ids) > 1000
    assert max(windows) <= 8   # bounded by the longest character, not by the sequence


_ALPHABET = st.sampled_from(list("abc XYZ 0123456789.,!?\n\t") + list("你好世界测试日本語") +
                            ["😀", "👍🏽", "🇺🇸", "❤️", "é", "ß", "<|im_end|>"])


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(_ALPHABET, max_size=40), chunk=st.integers(1, 4), skip=st.booleans())
def test_detokenizer_property(tok, parts, chunk, skip):
    ids = tok.encode("".join(parts))
    pieces = _stream(tok, ids, chunk=chunk, skip=skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
