"""Tiny random HuggingFace models built from transformers configs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
             initializer_range=0.1)


def make_hf_model(family: str, out_dir: Path, *, seed: int = 0, **overrides) -> Path:
    """Save a random ``family`` (qwen2 | llama) causal LM as sharded safetensors in ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "rope_theta": 10000.0, **overrides}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "rope_theta": 500000.0, "attention_bias": False, **overrides}))
    with torch.no_grad():  # norms start at 1 in HF; make them informative for the tests
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="300KB")
    return out_dir
