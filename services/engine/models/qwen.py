"""Qwen2 / Qwen2.5 / Qwen3.

Same decoder as Llama; the differences are switched on by ModelConfig:
Qwen2 has a bias on the q/k/v projections (attention_bias), Qwen3 an RMSNorm
on each head of q and k before rotary (qk_norm), both may tie embeddings.
"""
from __future__ import annotations

from .llama import LlamaForCausalLM
from .registry import register_model


@register_model("qwen2")
class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


@register_model("qwen3")
class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
