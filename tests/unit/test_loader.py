"""Model resolution, GGUF conversion and weight loading (CPU, no network)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from services.engine import gguf_convert, loader
from services.engine.loader import ModelLoadError, iter_weights, list_models, resolve_model
from services.engine.model_registry import DEFAULT_MODEL, KNOWN_MODELS

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="session")
def default_source(cache_dir):
    return resolve_model(DEFAULT_MODEL)


# ---- the default model -------------------------------------------------------

def test_default_model_resolves_to_cached_hf_folder(default_source, cache_dir):
    s = default_source
    assert (s.name, s.load_format, s.path) == (DEFAULT_MODEL, "hf", cache_dir / DEFAULT_MODEL)
    assert s.has_tokenizer
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"):
        assert (s.path / f).is_file(), f
    mc = s.model_config
    assert (mc.family, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == ("llama", 30, 9, 3, 64)
    assert (mc.vocab_size, mc.tie_word_embeddings, mc.rope_theta, mc.rms_norm_eps) == (49152, True, 1e5, 1e-5)
    assert (mc.bos_token_id, mc.eos_token_ids) == (1, (2,))
    # no temporary or stale folder left next to it
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


def test_cache_is_reused(default_source):
    before = (default_source.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(DEFAULT_MODEL)
    assert again.path == default_source.path
    assert (again.path / "model.safetensors").stat().st_mtime_ns == before
    rows = {name: (desc, folder) for name, desc, folder in list_models()}
    assert set(rows) == set(KNOWN_MODELS)
    assert rows[DEFAULT_MODEL][1] == str(default_source.path)
    assert rows["llama-3.1-8b"][1] is None


def test_weights_equal_gguf_dequantize(default_source):
    """Bit for bit: gguf.quants.dequantize, then transformers' own inverse of llama.cpp's
    q/k permutation (its legacy GGUF loader), as an independent reference."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    weights = dict(iter_weights(default_source))
    assert len(weights) == 272 and "lm_head.weight" not in weights   # tied
    assert all(w.dtype == torch.float32 for w in weights.values())
    reader = gguf.GGUFReader(KNOWN_MODELS[DEFAULT_MODEL].gguf_path())
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    checked = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
               "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
               "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
               "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
               "blk.7.ffn_norm.weight": "model.layers.7.post_attention_layernorm.weight"}
    for t in reader.tensors:
        if t.name in checked:
            ref = gguf.quants.dequantize(t.data, t.tensor_type)
            ref = proc.process(ref, t.name).weights
            assert torch.equal(weights[checked[t.name]], torch.from_numpy(np.array(ref))), t.name


def test_kept_blocks_dequantize_to_the_fp32_weights(default_source):
    """gguf_blocks/ holds every quantized weight's raw blocks, rows in HF order: gguf's
    dequantization of them is the fp32 weight, bit for bit (what CPU decode reads)."""
    from safetensors import safe_open
    weights = dict(iter_weights(default_source))
    with safe_open(str(default_source.path / gguf_convert.BLOCKS_FILE), framework="numpy") as f:
        types = f.metadata()
        assert len(types) == 211                                   # 210 Q4_1 + the Q8_0 embedding
        for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.3.self_attn.k_proj.weight", "model.layers.29.mlp.up_proj.weight"]:
            w = gguf.quants.dequantize(f.get_tensor(name), gguf.GGMLQuantizationType(int(types[name])))
            assert torch.equal(weights[name], torch.from_numpy(w.reshape(weights[name].shape).copy())), name


def test_converted_model_runs_in_transformers(default_source):
    """A wrong q/k permutation still loads but babbles: greedy decoding must answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_source.path)
    model = AutoModelForCausalLM.from_pretrained(default_source.path)
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in answer, answer


def test_progress_bar_can_be_disabled(default_source, capfd, monkeypatch):
    monkeypatch.setenv("TANDEM_NO_PROGRESS", "1")
    next(iter_weights(default_source))
    assert "loading weights" not in capfd.readouterr().err
    monkeypatch.delenv("TANDEM_NO_PROGRESS")
    for _ in iter_weights(default_source):
        pass
    assert "loading weights" in capfd.readouterr().err


# ---- tiny GGUF files written here: both architectures, exact round trip ---------

def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute() of q/k rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tiny_hf_model(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                  rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=256)
    if arch == "llama":
        cfg = LlamaConfig(**common, head_dim=16, tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        model = LlamaForCausalLM(cfg)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0))
    for p in model.parameters():   # norms start at 1: make every tensor tell
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def _write_tiny_gguf(path: Path, model, arch: str) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "<|end|>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(258)
    w.add_add_bos_token(arch == "llama")
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    layer = {v: k for k, v in gguf_convert._LAYER_TENSORS.items()}
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        parts = name.split(".")
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if parts[1] == "layers":
            sub = ".".join(parts[3:-1])
            if arch == "llama" and parts[-2] in heads:
                a = _llamacpp_permute(a, heads[parts[-2]])
            gname = f"blk.{parts[2]}.{layer[sub]}.{parts[-1]}"
        else:
            gname = f"{names[parts[-2]]}.{parts[-1]}"
        w.add_tensor(gname, a)
    if arch == "llama":   # how llama.cpp stores llama3 rope scaling
        inv = model.model.rotary_emb.inv_freq.numpy()
        w.add_tensor("rope_freqs.weight", (1.0 / (inv * 500000.0 ** (np.arange(0, 16, 2) / 16))).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory, cache_dir):
    arch = request.param
    model = _tiny_hf_model(arch)
    path = tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf"
    _write_tiny_gguf(path, model, arch)
    return arch, model, path


def test_tiny_gguf_round_trip(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    arch, model, path = tiny
    source = resolve_model(str(path))
    assert source.load_format == "hf" and source.name == path.stem
    cfg = source.hf_config
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] == (arch == "qwen2")
    if arch == "llama":
        assert cfg["rope_scaling"]["rope_type"] == "llama3"
        assert math.isclose(cfg["rope_scaling"]["factor"], 8.0, rel_tol=1e-6)
    got = dict(iter_weights(source))
    want = {k: v for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(source.path).eval()
    ids = torch.tensor([[5, 80, 200, 17, 3, 99]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(source.path)
    ids = tok.encode("the heat")
    assert (ids[0] == 258) == (arch == "llama") and ids.count(258) <= 1   # add_bos_token
    assert 257 in ids   # "he", merged
    assert tok.decode(ids, skip_special_tokens=True) == "the heat"


def test_gguf_cache_keyed_by_size_and_mtime(tiny):
    _, _, path = tiny
    first = resolve_model(str(path)).path
    assert resolve_model(str(path)).path == first
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = resolve_model(str(path)).path
    assert second != first and second.is_dir()


def test_concurrent_resolves_convert_once(tiny, tmp_path, monkeypatch):
    """Prefill and decode workers start together: one converts, the other waits for it."""
    from concurrent.futures import ThreadPoolExecutor
    _, _, path = tiny
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    calls = []
    real = gguf_convert.convert_gguf
    monkeypatch.setattr(loader, "convert_gguf", lambda *a, **k: calls.append(1) or real(*a, **k))
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: resolve_model(str(path)).path, range(3)))
    assert len(set(paths)) == 1 and len(calls) == 1


def test_crash_mid_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    _, _, path = tiny
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(gguf_convert, "write_safetensors", boom)
    with pytest.raises(OSError):
        gguf_convert.convert_gguf(path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---- dummy shapes ---------------------------------------------------------------

@pytest.mark.parametrize("name,layers,kv_heads,vocab,tied,family", [
    ("llama-3.1-8b", 32, 8, 128256, False, "llama"),
    ("llama-3.2-1b", 16, 8, 128256, True, "llama"),
    ("qwen2.5-7b", 28, 4, 152064, False, "qwen2"),
    ("qwen2.5-0.5b", 24, 2, 151936, True, "qwen2"),
    ("smollm2-135m", 30, 3, 49152, True, "llama"),
])
def test_dummy_shapes(name, layers, kv_heads, vocab, tied, family):
    from transformers import AutoConfig
    s = resolve_model(name)
    assert (s.load_format, s.path, s.has_tokenizer) == ("dummy", None, False)
    mc = s.model_config
    assert (mc.family, mc.num_layers, mc.num_kv_heads, mc.vocab_size, mc.tie_word_embeddings) == \
        (family, layers, kv_heads, vocab, tied)
    assert mc.attention_bias == (family == "qwen2") and mc.head_dim in (64, 128)
    if name.startswith("llama-3"):
        assert mc.rope_scaling_dict["rope_type"] == "llama3" and mc.rope_theta == 500000.0
    d = dict(s.hf_config)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    assert hf.num_hidden_layers == layers and hf.architectures == s.hf_config["architectures"]
    s.hf_config["vocab_size"] = 1   # a copy: the registry is untouched
    assert resolve_model(name).hf_config["vocab_size"] == vocab
    with pytest.raises(ModelLoadError, match="dummy"):
        iter_weights(s).__next__()


def test_dummy_from_folder_and_config_file(default_source):
    s = resolve_model(str(default_source.path), load_format="dummy")
    assert (s.load_format, s.path, s.has_tokenizer) == ("dummy", default_source.path, True)
    s = resolve_model(str(default_source.path / "config.json"), load_format="dummy")
    assert s.load_format == "dummy" and s.model_config.num_layers == 30
    assert resolve_model(DEFAULT_MODEL, load_format="dummy").load_format == "dummy"


# ---- errors: one line, naming the file ------------------------------------------

def _hf_folder(tmp_path: Path, config="default", weights=True) -> Path:
    from safetensors.torch import save_file
    folder = tmp_path / "model"
    folder.mkdir()
    if config == "default":
        config = json.dumps(KNOWN_MODELS["smollm2-135m"].hf_config)
    if config is not None:
        (folder / "config.json").write_text(config)
    if weights:
        save_file({"model.norm.weight": torch.ones(576), "x": torch.zeros(64, 64)},
                  str(folder / "model.safetensors"))
    return folder


def _error(arg: str, load_format: str = "auto") -> str:
    with pytest.raises(ModelLoadError) as e:
        src = resolve_model(arg, load_format)
        list(iter_weights(src))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_valid_hf_folder_loads(tmp_path):
    s = resolve_model(str(_hf_folder(tmp_path)))
    assert s.load_format == "hf" and not s.has_tokenizer
    assert dict(iter_weights(s))["x"].shape == (64, 64)


def test_error_missing_folder(tmp_path):
    assert str(tmp_path / "nope") in _error(str(tmp_path / "nope"))


def test_error_unknown_name():
    msg = _error("no-such-model")
    assert "no-such-model" in msg and all(name in msg for name in KNOWN_MODELS)


def test_error_missing_config(tmp_path):
    assert "config.json" in _error(str(_hf_folder(tmp_path, config=None)))


def test_error_malformed_config(tmp_path):
    msg = _error(str(_hf_folder(tmp_path, config='{"architectures": [')))
    assert "config.json" in msg and "malformed JSON" in msg


def test_error_unsupported_architecture(tmp_path):
    cfg = json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    msg = _error(str(_hf_folder(tmp_path, config=cfg)))
    assert "config.json" in msg and "GPT2LMHeadModel" in msg


def test_error_no_safetensors(tmp_path):
    msg = _error(str(_hf_folder(tmp_path, weights=False)))
    assert "model" in msg and "safetensors" in msg


def test_error_truncated_safetensors(tmp_path):
    folder = _hf_folder(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    msg = _error(str(folder))
    assert "model.safetensors" in msg and "truncated" in msg


def test_error_garbage_safetensors(tmp_path):
    folder = _hf_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    assert "model.safetensors" in _error(str(folder))


def test_error_bad_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    assert "bad.gguf" in _error(str(bad))
    truncated = tmp_path / "cut.gguf"
    with open(KNOWN_MODELS[DEFAULT_MODEL].gguf_path(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    assert "cut.gguf" in _error(str(truncated))
    other = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    other.add_block_count(1)
    other.write_header_to_file()
    other.write_kv_data_to_file()
    other.write_tensors_to_file()
    other.close()
    msg = _error(str(tmp_path / "gpt2.gguf"))
    assert "gpt2.gguf" in msg and "unsupported GGUF architecture 'gpt2'" in msg


def test_error_wrong_formats(tmp_path, default_source):
    assert "dummy" in _error("llama-3.1-8b", "hf")
    assert "load_format" in _error(DEFAULT_MODEL, "onnx")
    assert "not a .gguf" in _error(str(default_source.path), "gguf")
    gguf_file = str(KNOWN_MODELS[DEFAULT_MODEL].gguf_path())
    assert gguf_file in _error(gguf_file, "hf")
