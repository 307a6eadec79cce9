"""The transformers reference: tiny random checkpoints and greedy outputs.

Greedy sequences are compared "up to floating-point ties": they must be
equal, except that they may part where the reference's two best logits were
closer than TIE_TOL (then anything after is legitimately different).
"""
from __future__ import annotations

from pathlib import Path

import torch

TIE_TOL = 2e-4
# A real checkpoint run in bf16 (SmolLM2) has logits of 20-40, where one bf16 step is 0.125-0.25:
# the transformers reference itself parts from itself there (SmolLM2 on a random prompt, step 12:
# tokens 216 and 68 both at 26.75 on CPU, 0.25 apart on an H100, each run picking another).
BF16_MODEL_TIE = 0.5

TINY = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, initializer_range=0.15,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, initializer_range=0.15),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, attention_bias=False, initializer_range=0.15),
}


def make_tiny_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    """A random HF checkpoint (config.json + model.safetensors) of a tiny config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = dict(TINY[family])
    cfg = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    cfg.architectures = d["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():   # visible biases / norms so that the paths that use them are tested
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


class Reference:
    """Greedy generation with transformers, one prompt at a time (no padding effects)."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_new_tokens: int, eos: tuple[int, ...] = ()
               ) -> tuple[list[int], list[float]]:
        """Token ids and, per step, the gap between the two best logits."""
        ids = torch.tensor([prompt], device=self.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True,
                                  eos_token_id=list(eos) or None, pad_token_id=0)
        toks = out.sequences[0, len(prompt):].tolist()
        gaps = [float(v[0] - v[1]) for v in (l[0].float().topk(2).values for l in out.logits)]
        return toks, gaps


def assert_greedy_equal(ours: list[int], ref: list[int], gaps: list[float], what: str = "") -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert gaps[i] < TIE_TOL, (f"{what}: token {i} differs ({a} vs reference {b}) and the "
                                       f"reference's top-2 gap {gaps[i]:.2e} is no tie\nours {ours}\nref  {ref}")
            return
    assert len(ours) == len(ref), f"{what}: length {len(ours)} vs reference {len(ref)}\nours {ours}\nref  {ref}"
