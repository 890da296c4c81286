"""SGLang generation engine, colocated with the trainer's torchrun ranks.

SGLang's offline ``Engine`` runs its model in scheduler subprocesses, one per TP rank, on GPUs
``base_gpu_id .. base_gpu_id + tp_size - 1``. So tensor-parallel rank 0 of each actor TP group
owns one ``Engine`` spanning its group's GPUs (TP groups are runs of consecutive local ranks,
and every rank sees all of the node's GPUs, as under torchrun); the other ranks of the group
hold none. All ranks of a group still call every method (SPMD): rank 0 does the work and
shares the results over the group, and a barrier keeps the other ranks from allocating on a
GPU the engine has not released yet.

API facts this module relies on, read in sgl-project/sglang (main branch, early 2026: the
``Engine`` with ``routed_dp_rank``, ``update_weights_from_ipc`` and ``self.loop``):

- ``python/sglang/srt/entrypoints/engine.py``: ``Engine(**ServerArgs)``;
  ``generate(input_ids=[[...], ...], sampling_params=[{...}, ...], return_logprob=True)``
  returns one dict per request, in request order; ``release_memory_occupation(tags=None)`` /
  ``resume_memory_occupation(tags=None)`` (all of ``weights`` and ``kv_cache`` when None; needs
  ``enable_memory_saver=True``; weights come back undefined unless the CPU backup is enabled);
  ``update_weights_from_tensor(named_tensors: List[Tuple[str, Tensor]], load_format=None,
  flush_cache=True)`` serialises the list once per TP rank and returns ``(success,
  message)`` (``tokenizer_manager.update_weights_from_tensor``); each scheduler's model
  ``load_weights`` cuts its own TP shard from the full tensors; ``flush_cache()``;
  ``shutdown()``, which kills every child process of the caller
  (``kill_process_tree(os.getpid(), include_parent=False)``, a name the module imports from
  ``sglang.srt.utils``) and is registered with ``atexit`` by ``Engine.__init__``;
  ``get_all_child_pids()`` (the schedulers and the detokenizer).
- ``python/sglang/srt/managers/tokenizer_manager.py``: a finished request's dict is
  ``{"text", "output_ids", "meta_info"}`` (without ``text`` under ``skip_tokenizer_init``);
  ``meta_info["output_token_logprobs"]`` is ``[(logprob, token_id, text_or_None), ...]``, one
  per output token; ``meta_info["finish_reason"]`` is a ``BaseFinishReason.to_json()`` dict
  (``python/sglang/srt/managers/schedule_batch.py``): ``{"type": "stop", "matched": ...}``,
  ``{"type": "length", "length": n}`` or ``{"type": "abort", "message": ...}``.
- ``python/sglang/srt/sampling/sampling_params.py``: ``max_new_tokens``, ``temperature`` (0 =
  greedy), ``top_p``, ``top_k`` (-1 = off), ``stop_token_ids``, ``n``, ``sampling_seed``;
  ``sampling_batch_info.py`` uses ``sampling_seed`` only under
  ``--enable-deterministic-inference``.
- ``python/sglang/srt/layers/sampler.py``: returned log-probs are log-softmax(logits /
  temperature) unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set, which returns the
  pre-temperature log-softmax (vLLM's default, and what the actor recomputes).
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

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

INSTALL_HINT = "rollout.engine=sglang needs the sglang package and a CUDA GPU: pip install -e '.[gpu]'"

_FINISH_TYPES = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass(frozen=True)
class SGLangRequests:
    """One SGLang request per response: each prompt repeated ``n`` times, prompt-major.

    Expanding here (instead of SGLang's ``n``) pins down the output order and lets every
    response carry its own seed.
    """

    input_ids: list[list[int]]  # [num_prompts * n] token ids
    sampling_params: list[dict[str, Any]]  # [num_prompts * n] SGLang sampling-param dicts
    prompt_index: list[int]  # [num_prompts * n] the prompt each request answers


def sglang_sampling_params(params: SamplingParams) -> dict[str, Any]:
    """SGLang's sampling-param dict for one response sampled as ``params`` says."""
    return {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,  # SGLang samples greedily (top_k=1) at 0, as we do
        "top_p": params.top_p,
        "top_k": params.top_k,  # -1 = whole vocabulary in SGLang too
        "stop_token_ids": list(params.stop_token_ids),
    }


def sglang_requests(prompts: Sequence[Sequence[int]], params: SamplingParams) -> SGLangRequests:
    """Expand prompts into per-response requests; response k of the call gets seed ``seed + k``.

    Distinct seeds keep a prompt's n responses apart when SGLang honours seeds
    (deterministic-inference mode); the same seed and prompts give the same seeds again.
    """
    base = sglang_sampling_params(params)
    input_ids, sampling, prompt_index = [], [], []
    for index, tokens in enumerate(token_id_lists(prompts)):
        for _ in range(params.n):
            request = dict(base)
            if params.seed is not None:
                request["sampling_seed"] = params.seed + len(input_ids)
            input_ids.append(tokens)
            sampling.append(request)
            prompt_index.append(index)
    return SGLangRequests(input_ids=input_ids, sampling_params=sampling, prompt_index=prompt_index)


def sglang_finish_reason(finish: Mapping[str, Any] | None) -> str:
    """Our finish reason for SGLang's ``meta_info["finish_reason"]`` dict (None = unfinished)."""
    if not finish:
        return "abort"
    # a type added by a later SGLang release ends the sample without the policy's say
    return _FINISH_TYPES.get(str(finish.get("type")), "abort")


def sglang_output_to_generation(output: Mapping[str, Any], prompt_index: int, *, with_logprobs: bool) -> Generation:
    """Our record for one SGLang result dict (``output_ids``, ``meta_info``)."""
    meta = output["meta_info"]
    token_ids = np.asarray(list(output["output_ids"]), dtype=np.int32)
    logprobs = None
    if with_logprobs:
        entries = meta.get("output_token_logprobs")
        if entries is None or len(entries) != len(token_ids):
            count = "no" if entries is None else len(entries)
            raise RuntimeError(f"SGLang returned {count} output log-probs for {len(token_ids)} tokens")
        logged = np.asarray([int(entry[1]) for entry in entries], dtype=np.int32)
        if not np.array_equal(logged, token_ids):
            raise RuntimeError("SGLang's output_token_logprobs name other tokens than output_ids")
        logprobs = np.asarray([float(entry[0]) for entry in entries], dtype=np.float32)
    return Generation(prompt_index=prompt_index, token_ids=token_ids,
                      finish_reason=sglang_finish_reason(meta.get("finish_reason")), logprobs=logprobs)


def group_generations(outputs: Sequence[Mapping[str, Any]], requests: SGLangRequests, num_prompts: int, *,
                      with_logprobs: bool) -> list[list[Generation]]:
    """Regroup per-request results (in request order) into one list per prompt."""
    if len(outputs) != len(requests.prompt_index):
        raise RuntimeError(f"SGLang returned {len(outputs)} results for {len(requests.prompt_index)} requests")
    grouped: list[list[Generation]] = [[] for _ in range(num_prompts)]
    for output, index in zip(outputs, requests.prompt_index):
        grouped[index].append(sglang_output_to_generation(output, index, with_logprobs=with_logprobs))
    return grouped


def stop_engine_only(engine: Any) -> None:
    """``engine.shutdown()``, which ends in ``kill_process_tree(os.getpid(), include_parent=False)``:
    every child of this process, the trainer's own too (wandb's service, grader pools). Within the
    call that kill is narrowed to the process trees of the engine's children
    (``Engine.get_all_child_pids()``: its schedulers and detokenizer)."""
    module = sys.modules[type(engine).__module__]
    kill_process_tree = module.kill_process_tree
    engine_pids = list(engine.get_all_child_pids())

    def kill_engine_children(parent_pid, include_parent=True, **kwargs):
        if parent_pid != os.getpid() or include_parent:
            return kill_process_tree(parent_pid, include_parent=include_parent, **kwargs)
        for pid in engine_pids:
            kill_process_tree(pid, include_parent=True, **kwargs)
        return None

    module.kill_process_tree = kill_engine_children
    try:
        engine.shutdown()
    finally:
        module.kill_process_tree = kill_process_tree


class SGLangEngine:
    """One rank's view of its TP group's SGLang engine (see the module docstring)."""

    def __init__(self, *, hf_dir: str, tensor_parallel: int, tp_rank: int, tp_group: Any, base_gpu_id: int,
                 mem_fraction_static: float, context_length: int, seed: int, bucket_bytes: int,
                 dtype: str = "bfloat16") -> None:
        sglang = import_engine_package("sglang", INSTALL_HINT)
        if tensor_parallel > 1 and not dist.is_initialized():
            raise RuntimeError("SGLangEngine with tensor_parallel > 1 runs inside the trainer's torch.distributed "
                               "world: build it after remix_megatron.parallel.init_parallel")
        # Read when the scheduler subprocesses start: report pre-temperature log-probs, the
        # same quantity as vLLM and the actor (set the variable yourself to choose otherwise).
        os.environ.setdefault("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
        self._tensor_parallel = tensor_parallel
        self._tp_group = tp_group
        self._bucket_bytes = bucket_bytes
        self._engine = None

        def start() -> None:
            self._engine = sglang.Engine(
                model_path=hf_dir, tp_size=tensor_parallel, base_gpu_id=base_gpu_id,
                mem_fraction_static=mem_fraction_static, enable_memory_saver=True, dtype=dtype,
                random_seed=seed, context_length=context_length,
                skip_tokenizer_init=True,  # prompts arrive as token ids; responses leave as token ids
            )
            # Engine registers its shutdown at exit, which would kill every child of this process then
            atexit.unregister(self._engine.shutdown)

        # a failed start on the engine's rank is raised on the whole group (which would wait for it)
        self._finish(self._attempt(start) if tp_rank == 0 else None, "start-up")
        self._live = True
        self._asleep = False

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` responses per prompt; every rank of the TP group gets the same result."""
        self._check_live()
        if self._asleep:
            raise RuntimeError("SGLangEngine.generate called while asleep; call wake_up() first")
        # every rank checks the prompts, so a bad one fails everywhere instead of stalling the broadcast
        requests = sglang_requests(prompts, params)
        result: list[list[Generation]] | None = None

        def run() -> None:
            nonlocal result
            outputs: Any = []
            if requests.input_ids:
                outputs = self._engine.generate(input_ids=requests.input_ids, sampling_params=requests.sampling_params,
                                                return_logprob=params.return_logprobs)
            if isinstance(outputs, Mapping):  # SGLang unwraps a batch of one request
                outputs = [outputs]
            result = group_generations(outputs, requests, len(prompts), with_logprobs=params.return_logprobs)

        self._finish(self._attempt(run) if self._engine is not None else None, "generation")
        return self._share(result)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send full HF-named tensors (CUDA tensors: they travel by CUDA IPC) in buckets of
        ``rollout.weight_sync_bucket_mb``; each SGLang TP rank keeps its own shard."""
        self._check_live()
        if self._asleep:  # released weight memory: a copy into it would be lost or worse
            raise RuntimeError("SGLangEngine.update_weights called while asleep; call wake_up() first")
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_bytes = 0
        error: BaseException | None = None
        # Every rank walks the whole iterator, even after a failed send: producing the full
        # tensors may take collectives.
        for name, tensor in named_tensors:
            if self._engine is None or error is not None:
                continue
            bucket.append((name, tensor))
            bucket_bytes += tensor.numel() * tensor.element_size()
            if bucket_bytes >= self._bucket_bytes:
                # flushing the KV cache once, after the last bucket, is enough
                error = self._attempt(lambda: self._send(bucket, flush_cache=False))
                bucket, bucket_bytes = [], 0
        if self._engine is not None and error is None:
            # (an empty last bucket still flushes: cached KV was computed with the old weights)
            error = self._attempt(lambda: self._send(bucket, flush_cache=True) if bucket
                                  else self._engine.flush_cache())
        self._finish(error, "weight update")

    def sleep(self) -> None:
        """Release the weights and the KV cache on all of the group's GPUs."""
        self._check_live()
        releasing = not self._asleep and self._engine is not None
        self._finish(self._attempt(self._engine.release_memory_occupation) if releasing else None, "sleep")
        self._asleep = True  # on every rank of the group, once the engine's rank has succeeded

    def wake_up(self) -> None:
        """Re-allocate weights and KV cache; the weights are undefined until ``update_weights``."""
        self._check_live()
        resuming = self._asleep and self._engine is not None
        self._finish(self._attempt(self._engine.resume_memory_occupation) if resuming else None, "wake-up")
        self._asleep = False

    def shutdown(self) -> None:
        """Stop the engine's subprocesses (only those); the engine cannot be used afterwards."""
        if not self._live:
            return
        error = self._attempt(lambda: stop_engine_only(self._engine)) if self._engine is not None else None
        self._engine = None
        self._live = False
        self._finish(error, "shutdown")

    @staticmethod
    def _attempt(action) -> BaseException | None:
        try:
            action()
        except Exception as error:  # raised on every rank of the group by _finish
            return error
        return None

    def _finish(self, error: BaseException | None, what: str) -> None:
        """End a call every rank of the group makes: TP rank 0's failure is raised on all of them
        (which would otherwise wait for it at the next collective). Also the group's barrier:
        no rank goes on (say, to allocate GPU memory) before the engine's rank is done."""
        if self._tensor_parallel == 1:
            if error is not None:
                raise error
            return
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self._tp_group, 0), group=self._tp_group)
        if box[0] is not None:
            raise RuntimeError(f"SGLang {what} failed on TP rank 0: {box[0]}") from error

    def _send(self, bucket: list[tuple[str, torch.Tensor]], *, flush_cache: bool) -> None:
        result = self._engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=flush_cache)
        if isinstance(result, tuple) and result and not result[0]:
            raise RuntimeError(f"SGLang update_weights_from_tensor failed: {result[1] if len(result) > 1 else result}")

    def _share(self, result: list[list[Generation]] | None) -> list[list[Generation]]:
        if self._tensor_parallel == 1:
            assert result is not None
            return result
        box = [result]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self._tp_group, 0), group=self._tp_group)
        return box[0]

    def _check_live(self) -> None:
        if not self._live:
            raise RuntimeError("SGLangEngine was shut down")


def sglang_context_length(rollout: RolloutConfig, model: ModelConfig) -> int:
    """``context_length`` plus one, within the position table: some SGLang releases refuse a
    request whose prompt + max_new_tokens *equals* the context length (``>=`` in
    ``TokenizerManager._validate_one_request``), which vLLM and newer SGLang accept."""
    return min(model.max_position_embeddings, context_length(rollout, model) + 1)


def make_sglang_engine(rollout: RolloutConfig, model: ModelConfig, state: ParallelState, hf_dir: str, *,
                       seed: int = 0) -> SGLangEngine:
    """The registered factory: one SGLang engine per actor TP group, sized by ``rollout``."""
    return SGLangEngine(hf_dir=hf_dir, tensor_parallel=state.tensor_parallel, tp_rank=state.tp_rank,
                        tp_group=state.tp_group, base_gpu_id=state.local_rank,
                        mem_fraction_static=rollout.gpu_memory_utilization,
                        context_length=sglang_context_length(rollout, model), seed=seed,
                        bucket_bytes=rollout.weight_sync_bucket_mb * 2**20, dtype=rollout.engine_dtype)

