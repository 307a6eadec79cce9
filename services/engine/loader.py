"""Find a model and read its weights.

resolve_model() turns what the user typed (a known name, an HF folder, a .gguf
file, a config.json) into a ModelSource; iter_weights() streams its tensors under
their Hugging Face names. A GGUF is converted once into an HF folder in the cache
($TANDEM_CACHE_DIR, else ~/.cache/tandem/models), so everything downstream reads
one format. Every failure is a ModelLoadError whose message is one line naming
the file at fault.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from services.engine.config import ModelConfig
from services.engine.gguf_convert import CONVERTER_VERSION, SOURCE_FILE, GGUFError, convert_gguf
from services.engine.model_registry import KNOWN_MODELS, KnownModel, get_known

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "hf", "gguf", "dummy")
_MAX_HEADER = 100 << 20   # a safetensors header longer than this is garbage, not a header


class ModelLoadError(Exception):
    """A model could not be found or read; the message is one line naming the file."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path | None            # HF folder; None for a dummy named shape
    hf_config: dict[str, Any]
    load_format: str             # 'hf' or 'dummy'

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config)

    @property
    def has_tokenizer(self) -> bool:
        return self.path is not None and (self.path / "tokenizer.json").is_file()


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR") or "~/.cache/tandem/models").expanduser()


def resolve_model(name_or_path: str, load_format: str = "auto") -> ModelSource:
    """What `name_or_path` names, checked enough that loading it will not fail half-way."""
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r} (one of {', '.join(LOAD_FORMATS)})")
    known = get_known(name_or_path)
    if known is not None:
        return _resolve_known(known, load_format)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if os.sep in name_or_path or name_or_path.startswith((".", "~")) or name_or_path.endswith(".gguf"):
            raise ModelLoadError(f"{path}: no such file or folder")
        raise ModelLoadError(f"unknown model {name_or_path!r}: known models are {', '.join(KNOWN_MODELS)}; "
                             f"or give the path of a Hugging Face folder or a .gguf file")
    is_gguf = path.is_file() and (path.suffix == ".gguf" or load_format == "gguf")
    if is_gguf and load_format != "hf":
        folder = _convert_cached(path, cache_root() / _gguf_cache_key(path))
        return _from_folder(folder, path.stem, "dummy" if load_format == "dummy" else "hf")
    if load_format == "gguf":
        raise ModelLoadError(f"{path}: not a .gguf file")
    if load_format == "dummy" and path.is_file():   # a config.json: its folder may hold a tokenizer
        return ModelSource(path.parent.name, path.parent, _read_config(path), "dummy")
    if path.is_dir():
        return _from_folder(path, path.name, "dummy" if load_format == "dummy" else "hf")
    raise ModelLoadError(f"{path}: not a Hugging Face model folder"
                         + ("" if load_format == "hf" else " nor a .gguf file"))


def _resolve_known(known: KnownModel, load_format: str) -> ModelSource:
    if not known.is_gguf:
        if load_format not in ("auto", "dummy"):
            raise ModelLoadError(f"model {known.name!r} is a dummy shape with no weights: "
                                 f"use load_format 'dummy' (not {load_format!r})")
        # a copy: the registry's dict is shared by every caller
        return ModelSource(known.name, None, copy.deepcopy(known.hf_config), "dummy")
    try:
        gguf = known.gguf_path()
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from None
    # A dummy run of a GGUF model converts it too (once): the folder brings the
    # config and, above all, the tokenizer.
    folder = _convert_cached(gguf, cache_root() / known.name)
    return _from_folder(folder, known.name, "dummy" if load_format == "dummy" else "hf")


def _from_folder(folder: Path, name: str, load_format: str) -> ModelSource:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such folder")
    cfg = _read_config(folder / "config.json")
    if load_format == "hf":
        for file in _weight_files(folder):
            _safetensors_header(file)
    return ModelSource(name, folder, cfg, load_format)


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ModelLoadError(f"{file}: missing (not a Hugging Face model folder)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, found {type(cfg).__name__}")
    try:
        ModelConfig.from_hf(cfg)
    except ValueError as e:
        raise ModelLoadError(f"{file}: {e}") from None
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{file}: missing or invalid field {e}") from None
    return cfg


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: missing (listed in {index.name})")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights")
    return files


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The header, after checking the file is as long as it says: a cheap test for a
    truncated download or copy, made before anything is loaded."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise ModelLoadError(f"{file}: not a safetensors file, or truncated ({size} bytes)")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise ModelLoadError(f"{file}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise ModelLoadError(f"{file}: truncated or corrupt safetensors ({size} bytes, header says {expected})")
    return header


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of every *.safetensors file, with a progress bar."""
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm
    if source.load_format != "hf" or source.path is None:
        raise ModelLoadError(f"{source.name}: a {source.load_format!r} source has no weights to read")
    files = _weight_files(source.path)
    total = sum(sum(k != "__metadata__" for k in _safetensors_header(f)) for f in files)
    with tqdm(total=total, desc="loading weights", unit="tensor", file=sys.stderr,
              disable=not progress_enabled()) as bar:
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{file}: corrupt safetensors ({e})".replace("\n", " ")) from None
            with handle:
                for name in handle.keys():
                    try:
                        tensor = handle.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise ModelLoadError(f"{file}: cannot read tensor {name} ({e})") from None
                    bar.update()
                    yield name, tensor


def progress_enabled() -> bool:
    return os.environ.get("TANDEM_NO_PROGRESS", "") in ("", "0")


def list_models() -> list[tuple[str, str, str | None]]:
    """(name, description, cached folder or None) of every known model."""
    rows = []
    for m in KNOWN_MODELS.values():
        folder = None
        if m.is_gguf:
            try:
                candidate = cache_root() / m.name
                folder = str(candidate) if _is_current(candidate, m.gguf_path()) else None
            except FileNotFoundError:
                pass
        rows.append((m.name, m.description, folder))
    return rows


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return f"{gguf.stem}-{digest[:12]}"


def _is_current(folder: Path, gguf: Path) -> bool:
    """Whether `folder` is a finished conversion of this very file, by this converter."""
    try:
        src = json.loads((folder / SOURCE_FILE).read_text())
        st = gguf.stat()
    except (OSError, ValueError):
        return False
    return (src.get("size") == st.st_size and src.get("mtime_ns") == st.st_mtime_ns
            and src.get("converter_version") == CONVERTER_VERSION
            and (folder / "model.safetensors").is_file())


def _convert_cached(gguf: Path, folder: Path) -> Path:
    if _is_current(folder, gguf):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Workers started together (prefill + decode) would otherwise convert twice.
        with _file_lock(folder.parent / f".{folder.name}.lock"):
            if _is_current(folder, gguf):
                return folder
            log.info("converting %s into %s (once)", gguf, folder)
            start = time.monotonic()
            convert_gguf(gguf, folder, progress=progress_enabled())
            log.info("converted %s in %.1f s", gguf.name, time.monotonic() - start)
    except GGUFError as e:
        raise ModelLoadError(f"{gguf}: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"{gguf}: cannot convert into {folder} ({e})") from None
    return folder


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
