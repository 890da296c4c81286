"""Generation engines (HF here; vLLM and SGLang on GPU) and weight sync from Megatron."""

from remix_megatron.rollout import hf_engine as _hf_engine  # noqa: F401  (registers "hf")
from remix_megatron.rollout.engine import ENGINES, Generation, GenerationEngine, SamplingParams


def get_engine_factory(name: str):
    """The factory for ``rollout.engine=name``; GPU engines are imported only when chosen."""
    if name == "vllm":
        from remix_megatron.rollout import vllm_engine  # noqa: F401
    elif name == "sglang":
        from remix_megatron.rollout import sglang_engine  # noqa: F401
    return ENGINES.get(name)


__all__ = ["ENGINES", "Generation", "GenerationEngine", "SamplingParams", "get_engine_factory"]
