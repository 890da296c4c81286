"""Weight sync: the actor's TP/PP-sharded parameters -> full HF-named tensors -> the engine.

Every rank's engine needs every tensor (vLLM/SGLang shard them again themselves), but each
pipeline stage holds only its own layers. Stage by stage, the stage's TP group gathers one
parameter at a time (``iter_full_tensors``), converts it to HF names, packs tensors into a
bucket of at most ``bucket_bytes`` (one tensor larger than that travels alone), and the
stage broadcasts the bucket over the pipeline group as one flat buffer. Peak extra memory
per rank: about two buckets plus the largest tensor; no rank ever holds the whole model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.config import ModelConfig
from remix_megatron.convert.hf import hf_tensors
from remix_megatron.models.sharding import iter_full_tensors
from remix_megatron.parallel import ParallelState
from remix_megatron.rollout.engine import GenerationEngine

logger = logging.getLogger(__name__)


def _buckets(tensors: Iterable[tuple[str, torch.Tensor]],
             bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        if bucket and size + tensor.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


def _broadcast_bucket(bucket: list[tuple[str, torch.Tensor]] | None, source: int, state: ParallelState
                      ) -> list[tuple[str, torch.Tensor]] | None:
    """Send one bucket from the pipeline rank ``source`` to the others (None ends a stage)."""
    meta = [[(name, tuple(t.shape), t.dtype) for name, t in bucket] if bucket is not None else None]
    global_source = dist.get_global_rank(state.pp_group, source)
    dist.broadcast_object_list(meta, src=global_source, group=state.pp_group)
    if meta[0] is None:
        return None
    dtype = meta[0][0][2]
    if any(entry[2] != dtype for entry in meta[0]):
        raise AssertionError("a bucket mixes dtypes")
    sizes = [int(np.prod(shape)) for _, shape, _ in meta[0]]
    if state.pp_rank == source:
        flat = torch.cat([t.reshape(-1) for _, t in bucket])
    else:
        flat = torch.empty(sum(sizes), dtype=dtype, device=state.runtime.device)
    dist.broadcast(flat, src=global_source, group=state.pp_group)
    return [(name, part.view(shape)) for (name, shape, _), part in zip(meta[0], flat.split(sizes))]


def iter_hf_buckets(chunks: Sequence[torch.nn.Module], state: ParallelState, model: ModelConfig, *,
                    bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of full HF-named actor tensors, the same on every rank (collective over all ranks)."""
    for stage in range(state.pipeline_parallel):
        if state.pipeline_parallel == 1:
            yield from _buckets(hf_tensors(iter_full_tensors(list(chunks), state), model), bucket_bytes)
            return
        if state.pp_rank == stage:
            for bucket in _buckets(hf_tensors(iter_full_tensors(list(chunks), state), model), bucket_bytes):
                yield _broadcast_bucket(bucket, stage, state)
            _broadcast_bucket(None, stage, state)
        else:
            while (bucket := _broadcast_bucket(None, stage, state)) is not None:
                yield bucket


@dataclass(frozen=True)
class SyncStats:
    tensors: int
    bytes: int
    buckets: int
    seconds: float


def sync_weights(engine: GenerationEngine, chunks: Sequence[torch.nn.Module], state: ParallelState,
                 model: ModelConfig, *, bucket_bytes: int = 512 << 20) -> SyncStats:
    """Stream the actor's current weights into ``engine`` (which must be awake)."""
    start = time.perf_counter()
    count = size = buckets = 0

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal count, size, buckets
        for bucket in iter_hf_buckets(chunks, state, model, bucket_bytes=bucket_bytes):
            buckets += 1
            for name, tensor in bucket:
                count, size = count + 1, size + tensor.nbytes
                yield name, tensor

    engine.update_weights(stream())
    return SyncStats(tensors=count, bytes=size, buckets=buckets, seconds=time.perf_counter() - start)


def logprob_gap(engine_logprobs: Sequence[np.ndarray], actor_logprobs: Sequence[np.ndarray]) -> float:
    """Mean |engine - actor| log-prob over all response tokens (the sync sanity metric)."""
    diffs = [np.abs(np.asarray(e, np.float64) - np.asarray(a, np.float64)) for e, a in zip(engine_logprobs,
                                                                                         actor_logprobs)]
    total = sum(d.size for d in diffs)
    return float(sum(d.sum() for d in diffs) / total) if total else 0.0


class LogprobMismatchError(RuntimeError):
    """The engine samples from a different policy than the actor trains (a silent RL killer)."""


def check_logprob_gap(gap: float, threshold: float) -> None:
    """Raise when the engine and the actor disagree by more than ``threshold`` (mean |diff|)."""
    if gap > threshold:
        raise LogprobMismatchError(
            f"engine vs actor log-prob gap {gap:.4f} exceeds rollout.logprob_check_threshold={threshold}: the "
            "engine's weights are out of sync with the actor, or its numerics differ (dtype, kernels, a model "
            "the name map does not cover). Importance ratios would be wrong from here on.")
