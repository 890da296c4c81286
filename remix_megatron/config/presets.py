"""Model presets: architecture values for known model families, selected by ``model.preset``.

Values are copied from each model's HuggingFace ``config.json`` (the tiny ones are ours).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from remix_megatron.config.schema import ConfigError
from remix_megatron.families import MODEL_FAMILIES, family_of_model_type
from remix_megatron.registry import Registry

MODEL_PRESETS: Registry[Mapping[str, Any]] = Registry("model preset")


def _preset(name: str, **values: Any) -> None:
    MODEL_PRESETS.register(name, MappingProxyType(values))


# ~1M parameters, Qwen2 features (SwiGLU, RMSNorm, GQA, QKV bias, RoPE, untied embeddings):
# big enough to exercise every layer type, small enough for 2-core CPU tests and demos.
_preset("qwen2-tiny", family="qwen2", num_layers=4, hidden_size=128, ffn_hidden_size=352,
        num_attention_heads=4, num_query_groups=2, vocab_size=1024, max_position_embeddings=1024,
        rotary_base=10000.0, norm_epsilon=1e-6, add_qkv_bias=True, tie_word_embeddings=False)
_preset("llama-tiny", family="llama", num_layers=4, hidden_size=128, ffn_hidden_size=352,
        num_attention_heads=4, num_query_groups=2, vocab_size=1024, max_position_embeddings=1024,
        rotary_base=500000.0, norm_epsilon=1e-5, add_qkv_bias=False, tie_word_embeddings=False)
# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (the paper's 1.5B base)
_preset("r1-distill-qwen-1.5b", family="qwen2", num_layers=28, hidden_size=1536, ffn_hidden_size=8960,
        num_attention_heads=12, num_query_groups=2, vocab_size=151936, max_position_embeddings=131072,
        rotary_base=10000.0, norm_epsilon=1e-6, add_qkv_bias=True, tie_word_embeddings=False)
# deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (the paper's 7B base)
_preset("r1-distill-qwen-7b", family="qwen2", num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
        num_attention_heads=28, num_query_groups=4, vocab_size=152064, max_position_embeddings=131072,
        rotary_base=10000.0, norm_epsilon=1e-6, add_qkv_bias=True, tie_word_embeddings=False)
# meta-llama/Meta-Llama-3-8B
_preset("llama3-8b", family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
        num_attention_heads=32, num_query_groups=8, vocab_size=128256, max_position_embeddings=8192,
        rotary_base=500000.0, norm_epsilon=1e-5, add_qkv_bias=False, tie_word_embeddings=False)
# deepseek-ai/DeepSeek-R1-Distill-Qwen-32B (Qwen2.5-32B architecture): the 2 x 8 GPU scaling config
_preset("r1-distill-qwen-32b", family="qwen2", num_layers=64, hidden_size=5120, ffn_hidden_size=27648,
        num_attention_heads=40, num_query_groups=8, vocab_size=152064, max_position_embeddings=131072,
        rotary_base=1000000.0, norm_epsilon=1e-5, add_qkv_bias=True, tie_word_embeddings=False)
# deepseek-ai/DeepSeek-R1-Distill-Llama-70B (Llama-3.3-70B architecture): the 4 x 8 GPU scaling config.
# Its config.json also sets llama3 rope_scaling, which is not implemented: loading those weights
# through model.hf_path is refused; the preset serves layout planning and from-scratch runs.
_preset("r1-distill-llama-70b", family="llama", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
        num_attention_heads=64, num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
        rotary_base=500000.0, norm_epsilon=1e-5, add_qkv_bias=False, tie_word_embeddings=False)


def _rope_theta(hf: Mapping) -> float:
    """RoPE base: transformers 5 writes it into ``rope_parameters``, 4.x as top-level ``rope_theta``
    (transformers' own default, 10000, when neither is there)."""
    parameters = hf.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: Mapping) -> str:
    """The config's RoPE scaling as ``key=value`` ('' when unscaled): 4.x's ``rope_scaling``, or a
    transformers 5 ``rope_parameters`` whose ``rope_type`` is not "default"."""
    if hf.get("rope_scaling"):
        return f"rope_scaling={hf['rope_scaling']}"
    parameters = hf.get("rope_parameters") or {}
    if parameters.get("rope_type", "default") != "default":
        return f"rope_parameters={parameters}"
    return ""


def model_values_from_hf_config(hf: Mapping, *, source: str = "config.json") -> dict:
    """``ModelConfig`` values from an HF ``config.json`` of a registered family, refusing what we cannot run."""
    model_type = hf.get("model_type")
    family = family_of_model_type(model_type)
    if family is None:
        supported = ", ".join(MODEL_FAMILIES.get(name).model_type for name in MODEL_FAMILIES)
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {supported})")
    problems = []
    scaling = _rope_scaling(hf)
    if scaling:
        problems.append(f"{scaling} (scaled RoPE is not implemented)")
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (SwiGLU needs silu)")
    if problems:
        raise ConfigError(f"{source} uses features remix-megatron does not implement: " + "; ".join(problems))
    return dict(
        family=family, num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"], rotary_base=_rope_theta(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=MODEL_FAMILIES.get(family).qkv_bias(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def model_values_from_hf_dir(path: str) -> dict:
    """``ModelConfig`` values read from ``<path>/config.json`` (what ``model.hf_path`` fills in)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ConfigError(f"model.hf_path={path!r}: {config} does not exist")
    return model_values_from_hf_config(json.loads(config.read_text()), source=str(config))
