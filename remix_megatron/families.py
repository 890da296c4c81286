"""Model families: one object per architecture family holds everything the code needs to know about it.

``model.family`` names an entry of ``MODEL_FAMILIES``; reading ``config.json`` (``model.hf_path``),
exporting it, and converting weights (``convert/hf.py``) all ask the entry. Adding a family is one
``MODEL_FAMILIES.register`` call here. Only strings live here (no torch): the config layer imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from remix_megatron.registry import Registry

#: (Megatron name, HF names, transform); "{i}" is the layer index. Megatron names are those of a
#: single-process GPTModel with the local spec; transforms are ``convert.hf``'s (copy, qkv, gate_up).
WeightRows = tuple[tuple[str, tuple[str, ...], str], ...]

# The Llama-style decoder (Qwen2 and Llama share it; Qwen2 always has the QKV bias rows).
DECODER_LAYER_ROWS: WeightRows = (
    ("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "copy"),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"), "qkv"),
    ("decoder.layers.{i}.self_attention.linear_qkv.bias",
     ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
      "model.layers.{i}.self_attn.v_proj.bias"), "qkv"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), "copy"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), "copy"),
    ("decoder.layers.{i}.mlp.linear_fc1.weight",
     ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "gate_up"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), "copy"),
)
DECODER_GLOBAL_ROWS: WeightRows = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
)
CAUSAL_LM_HEAD: WeightRows = (("output_layer.weight", ("lm_head.weight",), "copy"),)
TOKEN_CLASSIFICATION_HEAD: WeightRows = (("output_layer.weight", ("score.weight",), "copy"),
                                         ("output_layer.bias", ("score.bias",), "copy"))


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """One architecture family: its HF names, the config.json fields that differ, its weight-name map."""

    model_type: str  # config.json "model_type"
    actor_architecture: str  # config.json "architectures" of the exported actor
    critic_architecture: str  # ... of the exported critic (one label: per-token values)
    qkv_bias_key: str = ""  # config.json key saying whether q/k/v have a bias; '' = they always do (Qwen2)
    export_fields: tuple[tuple[str, object], ...] = ()  # (key, value) written into every exported config.json
    layer_rows: WeightRows = DECODER_LAYER_ROWS
    global_rows: WeightRows = DECODER_GLOBAL_ROWS
    actor_head: WeightRows = CAUSAL_LM_HEAD
    critic_head: WeightRows = TOKEN_CLASSIFICATION_HEAD

    def qkv_bias(self, hf: Mapping) -> bool:
        """Whether the model described by config.json ``hf`` has a QKV bias."""
        return bool(hf.get(self.qkv_bias_key, False)) if self.qkv_bias_key else True

    def hf_fields(self, add_qkv_bias: bool) -> dict:
        """The family's own fields of an exported config.json."""
        fields = {self.qkv_bias_key: add_qkv_bias} if self.qkv_bias_key else {}
        return {**fields, **dict(self.export_fields)}


MODEL_FAMILIES: Registry[ModelFamily] = Registry("model family")
MODEL_FAMILIES.register("qwen2", ModelFamily(model_type="qwen2", actor_architecture="Qwen2ForCausalLM",
                                             critic_architecture="Qwen2ForTokenClassification"))
MODEL_FAMILIES.register("llama", ModelFamily(model_type="llama", actor_architecture="LlamaForCausalLM",
                                             critic_architecture="LlamaForTokenClassification",
                                             qkv_bias_key="attention_bias",
                                             export_fields=(("mlp_bias", False),)))


def family_of_model_type(model_type: object) -> str | None:
    """The registered family whose config.json ``model_type`` this is (None when none is)."""
    return next((name for name in MODEL_FAMILIES if MODEL_FAMILIES.get(name).model_type == model_type), None)
