"""Generation engines (HF here; vLLM and SGLang on GPU) and weight sync from Megatron."""

from remix_megatron.rollout.engine import ENGINES, EngineSpec, Generation, GenerationEngine, SamplingParams


def get_engine_factory(name: str):
    """The factory for ``rollout.engine=name``; an engine's module is imported only when it is chosen."""
    return ENGINES.get(name).load()


__all__ = ["ENGINES", "EngineSpec", "Generation", "GenerationEngine", "SamplingParams", "get_engine_factory"]
