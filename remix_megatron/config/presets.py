"""Model presets: architecture values for known model families, selected by ``model.preset``.

Values are copied from each model's HuggingFace ``config.json`` (the tiny ones are ours).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

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
