"""The generation-engine contract shared by the HF (CPU/GPU), vLLM and SGLang engines.

An engine lives beside the actor (colocated): it sleeps (frees its memory) while Megatron
trains, wakes up, receives the actor's fresh weights as HF-named tensors, and generates.
Engines never see the trajectory store or Megatron.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from remix_megatron.registry import Registry

if TYPE_CHECKING:
    from remix_megatron.config import ModelConfig, RolloutConfig

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample; the same meaning in every engine."""

    n: int = 1  # responses per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these
    seed: int | None = None  # same seed + same weights + same prompts = same responses
    return_logprobs: bool = True  # the engine's sampling log-probs, when it can give them

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n={self.n} and max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"temperature={self.temperature} must be >= 0, top_p={self.top_p} in (0, 1], "
                             f"top_k={self.top_k} -1 or >= 1")


@dataclass(frozen=True, eq=False)
class Generation:
    """One response to one prompt."""

    prompt_index: int  # position of its prompt in the generate() call
    token_ids: np.ndarray  # int32 [response_len], the stop token included when one ended it
    finish_reason: str  # stop | length | abort
    logprobs: np.ndarray | None = field(default=None)  # float32 [response_len] sampling log-probs, if given

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r} is not one of {', '.join(FINISH_REASONS)}")
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} log-probs for {len(self.token_ids)} tokens")


@runtime_checkable
class GenerationEngine(Protocol):
    """What the trainer needs from any generation engine."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` responses for each prompt (token ids), in prompt order."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) HF-named tensors into the engine's model, in place."""

    def sleep(self) -> None:
        """Release the engine's accelerator memory (weights and KV cache) until ``wake_up``."""

    def wake_up(self) -> None:
        """Re-acquire memory; weights must then be (re)loaded with ``update_weights``."""

    def shutdown(self) -> None:
        """Free everything; the engine cannot be used afterwards."""


#: factory(rollout config, model config, parallel state, hf_dir, *, seed) -> GenerationEngine
EngineFactory = Callable[..., GenerationEngine]


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """A registered engine: where its factory lives (imported only when chosen, so that naming vLLM or
    SGLang costs nothing) and the traits planning reads."""

    module: str  # the module defining the factory
    factory: str  # the factory's name in it
    tp_sharded: bool  # one replica per actor TP group with TP-sharded weights (vLLM, SGLang); else a full one per rank

    def load(self) -> EngineFactory:
        """The factory (ImportError when its module cannot be imported here)."""
        return getattr(importlib.import_module(self.module), self.factory)


ENGINES: Registry[EngineSpec] = Registry("generation engine")
ENGINES.register("hf", EngineSpec(module="remix_megatron.rollout.hf_engine", factory="make_hf_engine",
                                  tp_sharded=False))
ENGINES.register("vllm", EngineSpec(module="remix_megatron.rollout.vllm_engine", factory="make_vllm_engine",
                                    tp_sharded=True))
ENGINES.register("sglang", EngineSpec(module="remix_megatron.rollout.sglang_engine", factory="make_sglang_engine",
                                      tp_sharded=True))


def context_length(rollout: "RolloutConfig", model: "ModelConfig") -> int:
    """Tokens per sequence (prompt + response) an engine reserves KV room for, capped by the
    model's position table (vLLM and SGLang refuse a longer context)."""
    return min(model.max_position_embeddings, rollout.max_prompt_tokens + rollout.max_new_tokens)


def token_id_lists(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompts as plain lists of ints; ValueError on an empty prompt."""
    lists = [[int(token) for token in prompt] for prompt in prompts]
    empty = [index for index, prompt in enumerate(lists) if not prompt]
    if empty:
        raise ValueError(f"prompts {empty[:8]} are empty; every prompt needs at least one token")
    return lists


def import_engine_package(name: str, install_hint: str, *, needs_cuda: bool = True) -> Any:
    """Import an engine package, or raise RuntimeError saying what to install (and, for a
    GPU-only package, when this machine has no CUDA GPU)."""
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise RuntimeError(f"{install_hint} (import {name} failed: {error})") from error
    if needs_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"{install_hint} (torch.cuda.is_available() is False on this machine)")
    return module
