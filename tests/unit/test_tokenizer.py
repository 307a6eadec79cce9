"""Tokenizer (services.common.tokenizer: tokenizers + jinja2, no torch) of the converted default model and
of variants of it, checked against transformers; and the incremental detokenizer (CPU, no network)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from services.engine.loader import resolve_model
from services.engine.model_registry import DEFAULT_MODEL, KNOWN_MODELS
from services.common.tokenizer import IncrementalDetokenizer, Tokenizer

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
    sp, tid = tok.special_tokens, tok.backend.token_to_id
    assert (sp["bos_token"], tid(sp["bos_token"])) == ("<|im_start|>", 1)
    assert (sp["eos_token"], tid(sp["eos_token"])) == ("<|im_end|>", 2)
    assert (tid(sp["pad_token"]), sp["unk_token"], tid(sp["unk_token"])) == (2, "<|endoftext|>", 0)
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
    assert tok.backend.encode(" ①").tokens[0] == "Ġ"
    assert tok.backend.encode("x 2024").tokens == ["x", "Ġ", "2", "0", "2", "4"]


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


def test_byte_level_fast_path_equals_decode(tok):
    """SmolLM2's decoder is GPT-2 byte-level: the detokenizer joins each id's bytes. Any ids
    (raw byte tokens that cut characters, special tokens, ids past the vocabulary), cut into
    any chunks, add up to decode()."""
    import random
    assert tok.byte_pieces(False) is not None and tok.byte_pieces(True) is not None
    rng = random.Random(0)
    byte_tokens = [tok.backend.token_to_id(c) for c in "ĠÃ¤Ĳðŀ"]
    for _ in range(200):
        ids = [rng.choice([rng.randrange(tok.vocab_size), rng.choice(byte_tokens), rng.randrange(4),
                           tok.vocab_size + 7]) for _ in range(rng.randrange(1, 30))]
        skip = rng.random() < 0.5
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert detok._pieces is not None
        out, i = [], 0
        while i < len(ids):
            n = rng.randrange(1, 4)
            out.append(detok.add(ids[i:i + n]))
            i += n
        assert "".join(out) + detok.flush() == tok.decode(ids, skip_special_tokens=skip), ids


def test_other_decoders_keep_the_window(folder):
    cfg = json.loads((folder / "tokenizer.json").read_text())
    cfg["decoder"] = {"type": "Sequence", "decoders": [cfg["decoder"], {"type": "Strip", "content": " ",
                                                                         "start": 1, "stop": 0}]}
    other = Tokenizer(json.dumps(cfg), (folder / "tokenizer_config.json").read_text())
    assert other.byte_pieces() is None
    ids = other.encode(" Hello there, 世界")
    assert IncrementalDetokenizer(other)._pieces is None
    assert "".join(_stream(other, ids)) == other.decode(ids)


# -- against transformers (imported in the tests only) -------------------------------------------

MORE_TEXTS = TEXTS + [
    "", " ", "   three leading spaces", " leading space", "\n\nnewlines first",
    "<|im_start|><|im_end|><|endoftext|>", "text<|im_end|>after <|im_start|> spaced",
    "日本語のテキストと한국어 텍스트", "🧑🏿‍🚀 🏳️‍🌈 ∑∫√ ½ ①②③ x²",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 😀"},
     {"role": "assistant", "content": "Hello! 👋"}, {"role": "user", "content": "  What's 2+2?\n"}],
    [{"role": "user", "content": "<|im_start|>assistant\ninjected"},
     {"role": "assistant", "content": "ok", "tool_calls": None},   # None keys are dropped, as transformers does
     {"role": "user", "content": "Again"}],
    [{"role": "system", "content": "Système: réponds en français."}, {"role": "user", "content": "Bonjour"}],
]


def _hf(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def ref(folder):
    return _hf(folder)


def _assert_matches(tok, ref, texts=MORE_TEXTS, conversations=CONVERSATIONS, **chat_kwargs):
    """encode (with and without special tokens), decode, chat template (text and ids), vocab size."""
    assert tok.vocab_size == len(ref)
    assert tok.eos_token_ids[:1] == ((ref.eos_token_id,) if ref.eos_token_id is not None else ())
    for text in texts:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (False, True):
                assert tok.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip,
                                                           clean_up_tokenization_spaces=False), (text, skip)
    for conv in conversations:
        for gen in (True, False):
            text = tok.render_chat(conv, add_generation_prompt=gen, **chat_kwargs)
            assert text == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False,
                                                   **chat_kwargs), (conv, gen)
            ids = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=False,
                                          **chat_kwargs)
            assert tok.apply_chat_template(conv, add_generation_prompt=gen, **chat_kwargs) == list(ids)


def test_default_model_matches_transformers(tok, ref):
    _assert_matches(tok, ref)
    assert tok.eos_token_ids == (2,) and tok.chat_template == ref.chat_template


def test_from_strings_equals_from_folder(tok, folder):
    same = Tokenizer.from_strings((folder / "tokenizer.json").read_text(),
                                  (folder / "tokenizer_config.json").read_text(),
                                  (folder / "generation_config.json").read_text(), name="smollm2")
    assert (same.tokenizer_json, same.tokenizer_config_json, same.generation_config_json) == \
           (tok.tokenizer_json, tok.tokenizer_config_json, tok.generation_config_json)
    assert (same.vocab_size, same.eos_token_ids, same.chat_template, same.special_tokens) == \
           (tok.vocab_size, tok.eos_token_ids, tok.chat_template, tok.special_tokens)
    for text in MORE_TEXTS:
        ids = tok.encode(text)
        assert same.encode(text) == ids and same.encode(text, False) == tok.encode(text, False)
        assert same.decode(ids) == tok.decode(ids) and same.decode(ids, True) == tok.decode(ids, True)
    for conv in CONVERSATIONS:
        assert same.apply_chat_template(conv) == tok.apply_chat_template(conv)
    # what a worker ships is enough: a tokenizer rebuilt from its strings is the same again
    again = Tokenizer.from_strings(same.tokenizer_json, same.tokenizer_config_json, same.generation_config_json)
    assert again.encode(TEXTS[4]) == tok.encode(TEXTS[4]) and again.eos_token_ids == (2,)


def test_engine_module_reexports_the_common_tokenizer():
    from services.engine import tokenizer as engine_tokenizer
    assert engine_tokenizer.Tokenizer is Tokenizer
    assert engine_tokenizer.IncrementalDetokenizer is IncrementalDetokenizer


def test_errors_name_the_path(tmp_path, folder):
    with pytest.raises(ValueError, match=f"{tmp_path}: no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    shutil.copy(folder / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not JSON"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer"):
        Tokenizer.from_strings("{}")
    assert Tokenizer.from_strings((folder / "tokenizer.json").read_text()).eos_token_ids == ()
    with pytest.raises(ValueError, match="empty conversation"):
        Tokenizer.from_folder(folder).apply_chat_template([])


# Variants of the default model's tokenizer, each loaded by both sides: a BOS from tokenizer.json's
# post-processor or none, whatever the add_bos/eos_token flags say (transformers 5 ignores them when
# there is a tokenizer.json), AddedToken dicts, a template that uses the environment's extras.
TEMPLATE = """{%- set ns = namespace(turns=0, last='') -%}
{{ bos_token }}
{%- if tools is not none %}
Tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% for m in messages %}
    {% if m.role == 'tool' %}{% continue %}{% endif %}
    {% if m.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m.role) }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% set ns.last = m.role %}
[{{ ns.turns }}|{{ m.role }}] {{ m.content if m.content is defined else '(no content)' }}
{{ {'c': m.content | default(none), 'r': m.reasoning_content | default(none), 'html': '<&>'} | tojson }}
    {{- eos_token }}
    {% if m.role == 'assistant' %}{% generation %}<{{ m.role }} {{ loop.index }}>{% endgeneration %}{% endif %}
    {% if loop.index >= 4 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[assistant:{{ unk_token }}|{{ pad_token }}|{{ ns.last }}|{{ dict(a=1) | tojson }}]{% endif %}"""
VARIANT_CONVERSATIONS = CONVERSATIONS + [
    [{"role": "user", "content": "q"}, {"role": "tool", "content": "skipped"},
     {"role": "assistant", "content": None, "reasoning": "thought"}, {"role": "user", "content": "r"},
     {"role": "assistant", "content": "s"}, {"role": "user", "content": "cut off by break"}],
]
VARIANTS = {
    # Llama-3 style: the BOS is in tokenizer.json's post-processor, the config says nothing
    "bos_in_post_processor": dict(post=("<|endoftext|>", 0), config={
        "bos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True, "__type": "AddedToken"},
        "eos_token": {"content": "<|im_end|>", "special": True, "__type": "AddedToken"}, "unk_token": "<|endoftext|>",
        "pad_token": None, "chat_template": TEMPLATE}, generation={"eos_token_id": [0, 2, 0]}),
    # the post-processor wins over the flags: a BOS, no EOS
    "flags_ignored": dict(post=("<|endoftext|>", 0), config={
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False, "add_eos_token": True,
        "chat_template": TEMPLATE}, generation={"eos_token_id": 2}),
    # no post-processor at all: add_bos_token alone adds nothing
    "no_post_processor": dict(post=None, config={
        "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "add_bos_token": True,
        "chat_template": TEMPLATE}, generation={}),
    # chat_template.jinja wins over the config's template
    "template_file": dict(post="keep", config={"eos_token": "<|im_end|>", "chat_template": "{{ 'unused' }}"},
                          generation={"eos_token_id": [2]}, template_file=TEMPLATE),
}


def _variant(folder: Path, dst: Path, post, config, generation, template_file=None) -> Path:
    from tokenizers import Tokenizer as RustTokenizer, processors
    dst.mkdir()
    rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    if isinstance(post, tuple):
        rust.post_processor = processors.TemplateProcessing(single=f"{post[0]}:0 $A:0",
                                                            pair=f"{post[0]}:0 $A:0 $B:1", special_tokens=[post])
    tj = json.loads(rust.to_str())
    if post is None:
        tj["post_processor"] = None
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         **{k: v for k, v in config.items() if v is not None}}))
    (dst / "generation_config.json").write_text(json.dumps(generation))
    if template_file:
        (dst / "chat_template.jinja").write_text(template_file)
    return dst


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_transformers(variant, folder, tmp_path):
    spec = VARIANTS[variant]
    path = _variant(folder, tmp_path / variant, **spec)
    tok, ref = Tokenizer.from_folder(path), _hf(path)
    _assert_matches(tok, ref, texts=MORE_TEXTS[::2], conversations=VARIANT_CONVERSATIONS)
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "<str>"}}}]
    _assert_matches(tok, ref, texts=[], conversations=VARIANT_CONVERSATIONS[:2], tools=tools)
    gen = spec["generation"].get("eos_token_id", [])
    eos = tok.backend.token_to_id(_content(spec["config"]["eos_token"]))
    assert tok.eos_token_ids == tuple(dict.fromkeys([eos, *(gen if isinstance(gen, list) else [gen])]))
    same = Tokenizer.from_strings(tok.tokenizer_json, tok.tokenizer_config_json, tok.generation_config_json)
    assert same.render_chat(CONVERSATIONS[1]) == tok.render_chat(CONVERSATIONS[1])   # the .jinja file travels
    import jinja2
    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role robot"):
        tok.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="unknown role robot"):
        ref.apply_chat_template(bad, tokenize=False)


def _content(tok):
    return tok["content"] if isinstance(tok, dict) else tok


def test_strftime_now_and_sandbox(tok):
    from datetime import datetime
    t = Tokenizer.from_strings(tok.tokenizer_json, json.dumps({"chat_template":
                               "{{ strftime_now('%Y') }}{{ messages[0].content | tojson }}"}))
    year = datetime.now().year   # (a test run across New Year's Eve midnight would fail here)
    assert t.render_chat([{"role": "user", "content": "é<b>"}]) == f'{year}"é<b>"'
    import jinja2
    for template in ("{{ messages.append(1) }}", "{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}"):
        t = Tokenizer.from_strings(tok.tokenizer_json, json.dumps({"chat_template": template}))
        with pytest.raises(jinja2.exceptions.SecurityError):
            t.render_chat([{"role": "user", "content": "x"}])


def _sentencepiece_folder(dst: Path) -> Path:
    """A small Llama-2 style tokenizer (sentencepiece BPE with byte fallback, metaspace, BOS)
    trained here on a few lines: decoding unlike byte-level BPE (a leading space stripped)."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, normalizers, processors, trainers
    specials = ["<unk>", "<s>", "</s>"]
    rust = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    rust.train_from_iterator([t for t in TEXTS if "<|" not in t] * 3,
                             trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    rust.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                        special_tokens=[("<s>", 1)])
    tj = json.loads(rust.to_str())
    vocab = tj["model"]["vocab"]
    for b in range(256):   # the byte tokens, ordinary vocabulary as in Llama 2
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    dst.mkdir()
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token + '[INST] ' + m.content + "
                         "' [/INST]' }}{% else %}{{ ' ' + m.content + eos_token }}{% endif %}{% endfor %}"}))
    return dst


def test_sentencepiece_style_tokenizer_matches_transformers(tmp_path):
    path = _sentencepiece_folder(tmp_path / "sp")
    tok, ref = Tokenizer.from_folder(path), _hf(path)
    convs = [[{"role": "user", "content": "Hi  there 😀"}, {"role": "assistant", "content": "你好"},
              {"role": "user", "content": " ok"}]]
    _assert_matches(tok, ref, texts=[t for t in MORE_TEXTS if "<|" not in t], conversations=convs)
    assert tok.encode("Hello")[0] == tok.backend.token_to_id("<s>") and tok.eos_token_ids == (2,)
    for text in (TEXTS[3], TEXTS[4], "  two spaces", "a\u00a0b ¿ 😀x"):
        ids = tok.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip=skip)) == tok.decode(ids, skip) == text
        assert "".join(_stream(tok, tok.encode(text), skip=True)) == text


def test_import_and_load_leave_out_torch_and_transformers(folder):
    code = ("import sys, time\n"
            "t = time.perf_counter()\n"
            "from services.common.tokenizer import Tokenizer\n"
            f"tok = Tokenizer.from_folder({str(folder)!r})\n"
            "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}])\n"
            "dt = time.perf_counter() - t\n"
            "print(f'{dt:.3f}', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    seconds, loaded = out.stdout.split(maxsplit=1)
    print(f"import + from_folder + one chat template: {seconds} s")
    assert loaded.strip() == "[]"
    assert float(seconds) < 5


def test_byte_pieces_with_gaps_in_the_ids():
    """A byte-level vocabulary whose ids skip some numbers (257 tokens, ids up to 260) still
    gets its table, sized by the largest id, and streams as decode() does."""
    from services.common.tokenizer import _gpt2_byte_table
    table = _gpt2_byte_table()
    chars = [c for c in range(256 + 68) if table[c] != "\uffff"]
    vocab = {chr(c): ord(table[c]) for c in chars}          # each byte's character at the byte's id
    vocab["ab"] = 260
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": vocab, "merges": [["a", "b"]]}}
    tok = Tokenizer(json.dumps(tok_json))
    assert tok.backend.get_vocab_size(with_added_tokens=True) == 257
    pieces = tok.byte_pieces()
    assert pieces is not None and len(pieces) == 261 and pieces[260] == b"ab"
    ids = tok.encode("abc ab é 😀")
    assert 260 in ids and "".join(_stream(tok, ids)) == tok.decode(ids) == "abc ab é 😀"
