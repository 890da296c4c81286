"""HuggingFace <-> Megatron conversion (Qwen2, Llama): name maps, loading, export, verification."""

from remix_megatron.convert.hf import ConversionError, HFWeights, MegatronFromHF, hf_tensors, name_map

__all__ = ["ConversionError", "HFWeights", "MegatronFromHF", "hf_tensors", "name_map"]
