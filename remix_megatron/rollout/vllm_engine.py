"""vLLM generation engine, colocated inside the trainer's torchrun ranks.

Every rank builds its own ``vllm.LLM`` with ``distributed_executor_backend="external_launcher"``:
vLLM then runs one in-process worker per rank and reuses the trainer's torch.distributed world.
vLLM lays that world out as ``ExternalDP x DP x PP x TP`` with TP innermost, so each run of
``tensor_parallel`` consecutive ranks is one vLLM TP group, the same contiguous groups as
Megatron's TP groups (Megatron's default order puts TP innermost too). Each TP group is an
independent replica: all its ranks must call ``generate`` with the same prompts and
parameters (the engines do not talk to each other; they stay in step because scheduling and
seeded sampling are deterministic), while different TP groups (data-parallel ranks) generate
for different prompts.

API facts this module relies on, read in vllm-project/vllm (main branch, early 2026: the
``LLM`` with ``init_weight_transfer_engine``/``update_weights`` and ``seed: int = 0``):

- ``vllm/entrypoints/llm.py``: ``LLM(model, tensor_parallel_size, dtype, seed,
  gpu_memory_utilization, skip_tokenizer_init, **EngineArgs)`` (``enable_sleep_mode``,
  ``distributed_executor_backend``, ``max_model_len`` are EngineArgs);
  ``generate(prompts, sampling_params, use_tqdm=...)`` returns one ``RequestOutput`` per
  prompt, in prompt order; ``sleep(level=1)`` offloads weights to CPU, discards the KV cache
  and resets the prefix cache; ``wake_up(tags=None)``; ``apply_model(fn)`` runs
  ``fn(model)`` in every worker of this process; ``reset_prefix_cache()``.
- ``vllm/v1/executor/uniproc_executor.py`` (``ExecutorWithExternalLauncher``): env://
  rendezvous from ``RANK`` / ``LOCAL_RANK``; asserts ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  (``vllm/config/parallel.py`` sets it for this backend). The torchrun examples
  (``examples/features/torchrun/torchrun_example_offline.py``) pass an explicit ``seed`` so
  every rank samples the same tokens.
- ``vllm/distributed/parallel_state.py``: an initialised torch.distributed world is reused
  (never re-initialised); groups come from ``arange(world).reshape(-1, dp, pp, pcp, tp)``.
- ``vllm/v1/worker/worker_base.py`` ``apply_model(fn) = fn(self.get_model())`` and
  ``vllm/v1/worker/gpu_model_runner.py`` ``get_model()`` unwraps the CUDA-graph wrapper; the
  model's ``load_weights(weights)`` takes full HF-named tensors and each parameter's
  ``weight_loader`` cuts this rank's TP shard (and fuses q/k/v, gate/up) in place.
- ``vllm/outputs.py`` ``CompletionOutput(index, text, token_ids, cumulative_logprob,
  logprobs, finish_reason, stop_reason)``; ``vllm/logprobs.py``: ``logprobs`` is a sequence
  (``list`` or ``FlatLogprobs``) with one ``{token_id: Logprob(logprob, rank,
  decoded_token)}`` per generated token; ``SamplingParams(logprobs=0)`` returns only the
  sampled token's entry. The default ``logprobs_mode="raw_logprobs"`` is the log-softmax of
  the model's logits before temperature / top-k / top-p: the quantity the actor recomputes.
- ``vllm/v1/engine/__init__.py``: ``FINISH_REASON_STRINGS = ("stop", "length", "abort",
  "error", "repetition")``.
"""

from __future__ import annotations

import gc
import os
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.rollout.engine import (
    ENGINES, Generation, SamplingParams, context_length, import_gpu_package, token_id_lists,
)

if TYPE_CHECKING:
    from remix_megatron.config import ModelConfig, RolloutConfig
    from remix_megatron.parallel import ParallelState

INSTALL_HINT = "rollout.engine=vllm needs the vllm package and a CUDA GPU: pip install -e '.[gpu]'"

# vLLM's finish reasons -> ours. "error" (a failed request) and "repetition" (vLLM cut a
# repetitive loop) are not the policy's own ending, so the sample counts as aborted.
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "abort", "repetition": "abort"}


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` that sample as ``params`` says."""
    return {
        "n": params.n,
        "temperature": params.temperature,  # vLLM samples greedily below 1e-5, as our 0 means
        "top_p": params.top_p,
        "top_k": params.top_k,  # -1 = off in every vLLM release (newer ones also take 0)
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "seed": params.seed,
        # 0 = no top-k alternatives, only the sampled token's log-prob at each position
        "logprobs": 0 if params.return_logprobs else None,
        "detokenize": False,  # only token ids are used, and no tokenizer is loaded
    }


def vllm_request_seeds(params: SamplingParams, num_prompts: int) -> list[int | None]:
    """One seed per prompt: ``seed + index * n``. vLLM seeds a request's k-th response with
    ``seed + k`` (``vllm/v1/engine/parallel_sampling.py``), so every response of the call gets
    its own seed, as in the SGLang engine. (One shared ``SamplingParams`` would give every
    prompt the same seed: the same random draws for all prompts of a batch.)"""
    if params.seed is None:
        return [None] * num_prompts
    return [params.seed + index * params.n for index in range(num_prompts)]


def vllm_finish_reason(reason: object) -> str:
    """Our finish reason for vLLM's (a string or ``FinishReason``; None = never finished)."""
    if reason is None:
        return "abort"
    # a reason added by a later vLLM release ends the sample without the policy's say
    return _FINISH_REASONS.get(str(reason), "abort")


def sampled_token_logprobs(token_ids: Sequence[int], position_logprobs: Sequence[Any] | None) -> np.ndarray:
    """float32 [len(token_ids)] log-probs of the sampled tokens.

    ``position_logprobs[i]`` maps token id -> ``Logprob`` (or a bare float) at output position
    ``i``; it may hold other tokens too, so the sampled one is looked up by id.
    """
    if position_logprobs is None:
        raise RuntimeError("vLLM returned no log-probs although SamplingParams.logprobs was set")
    if len(position_logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(position_logprobs)} log-prob positions for {len(token_ids)} tokens")
    values = np.empty(len(token_ids), dtype=np.float32)
    for position, (token_id, entry) in enumerate(zip(token_ids, position_logprobs)):
        if token_id not in entry:
            raise RuntimeError(f"vLLM's log-probs at position {position} lack the sampled token {token_id}")
        logprob = entry[token_id]
        values[position] = getattr(logprob, "logprob", logprob)
    return values


def vllm_output_to_generations(output: Any, prompt_index: int, *, with_logprobs: bool) -> list[Generation]:
    """Our records for one ``vllm.RequestOutput``, ordered by ``CompletionOutput.index``.

    ``output.outputs`` holds the request's n ``CompletionOutput``s (``index``, ``token_ids``,
    ``logprobs``, ``finish_reason``).
    """
    completions = sorted(output.outputs, key=lambda completion: completion.index)
    return [
        Generation(
            prompt_index=prompt_index,
            token_ids=np.asarray(list(completion.token_ids), dtype=np.int32),
            finish_reason=vllm_finish_reason(completion.finish_reason),
            logprobs=sampled_token_logprobs(completion.token_ids, completion.logprobs) if with_logprobs else None,
        )
        for completion in completions
    ]


class VLLMEngine:
    """One rank's share of a colocated vLLM replica (see the module docstring)."""

    def __init__(self, *, hf_dir: str, tensor_parallel: int, rank: int, local_rank: int,
                 gpu_memory_utilization: float, max_model_len: int, seed: int) -> None:
        vllm = import_gpu_package("vllm", INSTALL_HINT)
        if not dist.is_initialized():
            raise RuntimeError("VLLMEngine runs inside the trainer's torch.distributed world: "
                               "build it after remix_megatron.parallel.init_parallel")
        # The external launcher reads the rank from the environment; a single process started
        # with plain python has no torchrun variables, so give it ours.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        # Workers must run in this process (vLLM asserts it for the external launcher).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
            # sleep mode's CuMemAllocator (vllm/device_allocator/cumem.py) asserts on it, deep in start-up
            raise RuntimeError("rollout.engine=vllm sleeps between rollouts, and vLLM's sleep mode does not work with "
                               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: unset it for colocated runs")
        self._vllm = vllm
        self._llm = vllm.LLM(
            model=hf_dir,
            tensor_parallel_size=tensor_parallel,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=True,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype="bfloat16",
            # the same seed on every rank keeps unseeded sampling identical within a TP group
            seed=seed,
            max_model_len=max_model_len,
            skip_tokenizer_init=True,  # prompts arrive as token ids; responses leave as token ids
        )
        self._asleep = False

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` responses per prompt; all ranks of a TP group must pass the same prompts."""
        llm = self._live_llm()
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call wake_up() first")
        requests = [{"prompt_token_ids": tokens} for tokens in token_id_lists(prompts)]
        if not requests:
            return []
        kwargs = vllm_sampling_kwargs(params)
        sampling = [self._vllm.SamplingParams(**{**kwargs, "seed": seed})
                    for seed in vllm_request_seeds(params, len(requests))]
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        return [vllm_output_to_generations(output, index, with_logprobs=params.return_logprobs)
                for index, output in enumerate(outputs)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full HF-named tensors into the awake model; each rank keeps its own TP shard."""
        llm = self._live_llm()
        if self._asleep:
            raise RuntimeError("VLLMEngine.update_weights called while asleep; call wake_up() first")
        # load_weights consumes the iterator lazily, so only one tensor at a time is extra.
        llm.apply_model(lambda model: model.load_weights(weights=named_tensors))
        # KV blocks cached under the old weights would be reused for matching prefixes.
        llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Offload weights to CPU and drop the KV cache (vLLM sleep level 1)."""
        if not self._asleep:
            self._live_llm().sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Re-allocate weights (restored from the CPU copy) and the KV cache."""
        if self._asleep:
            self._live_llm().wake_up()
            self._asleep = False

    def shutdown(self) -> None:
        """Stop the engine and free its GPU memory. The torch.distributed world is the trainer's
        and stays up, so vLLM's own cleanup (which destroys it) is not called."""
        if self._llm is None:
            return
        engine = self._llm.llm_engine
        stop = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if stop is not None:
            stop()
        self._llm = None
        gc.collect()
        torch.cuda.empty_cache()

    def _live_llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("VLLMEngine was shut down")
        return self._llm


def make_vllm_engine(rollout: RolloutConfig, model: ModelConfig, state: ParallelState, hf_dir: str, *,
                     seed: int = 0) -> VLLMEngine:
    """The registered factory: a vLLM replica per actor TP group, sized by ``rollout``."""
    return VLLMEngine(hf_dir=hf_dir, tensor_parallel=state.tensor_parallel, rank=state.rank,
                      local_rank=state.local_rank, gpu_memory_utilization=rollout.gpu_memory_utilization,
                      max_model_len=context_length(rollout, model), seed=seed)


ENGINES.register("vllm", make_vllm_engine)
