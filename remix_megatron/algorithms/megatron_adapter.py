"""The one adapter between our pure losses and Megatron's pipeline schedules.

Megatron 0.16 runs ``forward_step_func(data_iterator, model) -> (output, loss_func)`` and
calls ``loss_func(output)`` on the last pipeline stage only. Our loss functions return
``(numerator, denominator, logging_dict)``; the models are built with
``calculate_per_token_loss=True``, so the schedule sums numerators over micro-batches and
``finalize_model_grads`` divides the gradients by the denominator summed over micro-batches
and data-parallel ranks. Hence the gradient of a global batch does not depend on how it is
split into micro-batches, DP ranks, PP stages or TP shards.

Batches are ``MicroBatch`` records (``[micro_batch, seq]`` tensors, right-padded, each
position ``t`` aligned with ``labels[t]``, the token emitted there).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from remix_megatron.algorithms.losses import ActorLossInputs, actor_loss, critic_loss
from remix_megatron.algorithms.metrics import Max, Mean, Metric, Min, finalize, merge
from remix_megatron.config import AlgorithmConfig
from remix_megatron.models.logprobs import vocab_parallel_logprobs_entropy
from remix_megatron.parallel import ParallelState


@dataclass(frozen=True)
class CriticTargets:
    """``[batch, seq]`` critic training targets."""

    loss_mask: torch.Tensor
    old_values: torch.Tensor  # the critic's values as the iteration starts (the clip centre)
    returns: torch.Tensor  # value targets (V-trace or GAE returns)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: model inputs plus what the actor or critic loss needs."""

    tokens: torch.Tensor  # [b, s] input token ids
    labels: torch.Tensor  # [b, s] the token emitted at each position (tokens shifted by one)
    actor: ActorLossInputs | None = None
    critic: CriticTargets | None = None

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: t.to(device)  # noqa: E731
        return MicroBatch(tokens=self.tokens.to(device), labels=self.labels.to(device),
                          actor=_map_record(self.actor, move), critic=_map_record(self.critic, move))


def _map_record(record, function):
    """Apply ``function`` to every tensor field of a record dataclass (None stays None)."""
    if record is None:
        return None
    return type(record)(**{f.name: function(getattr(record, f.name)) for f in fields(record)})


def split_micro_batches(tokens: torch.Tensor, labels: torch.Tensor, size: int, *, actor: ActorLossInputs | None = None,
                        critic: CriticTargets | None = None) -> list[MicroBatch]:
    """Cut ``[rows, seq]`` tensors (and the rows of ``actor`` / ``critic``) into micro-batches of ``size`` rows."""
    out = []
    for start in range(0, tokens.size(0), size):
        part = slice(start, start + size)
        out.append(MicroBatch(tokens=tokens[part], labels=labels[part], actor=_map_record(actor, lambda t: t[part]),
                              critic=_map_record(critic, lambda t: t[part])))
    return out


LossFunc = Callable[[torch.Tensor], tuple]
LossBuilder = Callable[[MicroBatch], LossFunc]


def _causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """Megatron's convention: True = masked out; ``[1, 1, s, s]``."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _autocast(state: ParallelState) -> contextlib.AbstractContextManager:
    """What model passes run under: bf16 autocast for precision=bf16 on CPU (fp32 weights), else nothing."""
    if state.runtime.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.runtime.device.type, dtype=state.runtime.autocast_dtype)


def _in_fp32(loss_func: LossFunc, device_type: str) -> LossFunc:
    """``loss_func`` outside autocast, on fp32 outputs: log-softmax, ratios and losses stay fp32."""

    def run(output: torch.Tensor):
        with torch.autocast(device_type, enabled=False):
            return loss_func(output.float())

    return run


def run_pipeline(chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch], build_loss: LossBuilder,
                 state: ParallelState, *, forward_only: bool) -> list[dict]:
    """Run Megatron's forward(-backward) schedule; returns the last stage's logging dicts."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("no micro-batches to run")
    batch_size, seq_length = micro_batches[0].tokens.shape
    device = state.runtime.device
    attention_mask = _causal_mask(seq_length, device)
    position_ids = torch.arange(seq_length, device=device).unsqueeze(0).expand(batch_size, -1)

    autocast = state.runtime.autocast_dtype is not None

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(device)
        output = model(batch.tokens, position_ids, attention_mask)
        return output, _in_fp32(build_loss(batch), device.type) if autocast else build_loss(batch)

    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    # The backward runs under autocast too: Megatron's linear backward multiplies the bf16 output
    # gradient by the fp32 weight it saved and restores only CUDA's autocast state (custom_bwd).
    with torch.no_grad() if forward_only else torch.enable_grad(), _autocast(state):
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=list(chunks),
            num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=batch_size,
            forward_only=forward_only)


def actor_loss_builder(cfg: AlgorithmConfig, state: ParallelState, *, kl_lambda: float) -> LossBuilder:
    """Loss functions for an actor update with the configured ReMix/PPO/GRPO loss."""

    def loss_func(batch: MicroBatch, logits: torch.Tensor):
        logprobs, entropy = vocab_parallel_logprobs_entropy(logits, batch.labels, state.tp_group)
        result = actor_loss(logprobs, entropy, batch.actor, cfg, kl_lambda=kl_lambda)
        return result.numerator, result.denominator, {"metrics": result.metrics}

    return lambda batch: partial(loss_func, batch)


def critic_loss_builder(cfg: AlgorithmConfig) -> LossBuilder:
    """Loss functions for a critic update (clipped value loss)."""

    def loss_func(batch: MicroBatch, values: torch.Tensor):
        targets = batch.critic
        result = critic_loss(values.squeeze(-1).float(), targets.old_values, targets.returns, targets.loss_mask, cfg)
        return result.numerator, result.denominator, {"metrics": result.metrics}

    return lambda batch: partial(loss_func, batch)


def _zero_loss(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.new_zeros(()), torch.zeros((), dtype=torch.int, device=reference.device)


def _logprob_builder(state: ParallelState) -> LossBuilder:
    def loss_func(batch: MicroBatch, logits: torch.Tensor):
        logprobs, entropy = vocab_parallel_logprobs_entropy(logits, batch.labels, state.tp_group)
        return (*_zero_loss(logprobs), {"logprobs": logprobs, "entropy": entropy})

    return lambda batch: partial(loss_func, batch)


def _value_builder() -> LossBuilder:
    def loss_func(batch: MicroBatch, values: torch.Tensor):
        values = values.squeeze(-1).float()
        return (*_zero_loss(values), {"values": values})

    return lambda batch: partial(loss_func, batch)


def broadcast_from_last_stage(tensors: list[torch.Tensor] | None, shapes: list[tuple[int, ...]],
                              state: ParallelState) -> list[torch.Tensor]:
    """Give every pipeline stage the last stage's tensors (fp32, of the given shapes)."""
    if state.pipeline_parallel == 1:
        return tensors
    device = state.runtime.device
    out = tensors if state.is_last_stage else [torch.empty(shape, device=device) for shape in shapes]
    last = dist.get_global_rank(state.pp_group, state.pipeline_parallel - 1)
    for tensor in out:
        dist.broadcast(tensor, src=last, group=state.pp_group)
    return out


def forward_logprobs(chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch], state: ParallelState
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logprobs, entropy)``, ``[rows of micro_batches, seq]``, on every rank."""
    logs = run_pipeline(chunks, micro_batches, _logprob_builder(state), state, forward_only=True)
    rows = sum(batch.tokens.size(0) for batch in micro_batches)
    shape = (rows, micro_batches[0].tokens.size(1))
    local = [torch.cat([log[key] for log in logs]).float() for key in ("logprobs", "entropy")] if logs else None
    logprobs, entropy = broadcast_from_last_stage(local, [shape, shape], state)
    return logprobs, entropy


def forward_values(chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch], state: ParallelState
                   ) -> torch.Tensor:
    """Per-token critic values ``[rows of micro_batches, seq]`` on every rank."""
    logs = run_pipeline(chunks, micro_batches, _value_builder(), state, forward_only=True)
    shape = (sum(batch.tokens.size(0) for batch in micro_batches), micro_batches[0].tokens.size(1))
    local = [torch.cat([log["values"] for log in logs])] if logs else None
    return broadcast_from_last_stage(local, [shape], state)[0]


_REDUCE_OPS = {Mean: dist.ReduceOp.SUM, Max: dist.ReduceOp.MAX, Min: dist.ReduceOp.MIN}


def reduce_metrics(logs: list[dict], state: ParallelState) -> dict[str, float]:
    """Merge the loss metrics over micro-batches and DP ranks; the result is on every rank."""
    result: list[dict[str, float] | None] = [None]
    if state.is_last_stage:
        merged: dict[str, Metric] = merge(log["metrics"] for log in logs)
        keys = sorted(merged)  # identical on every DP rank: the same config makes the same keys
        for kind, op in _REDUCE_OPS.items():
            names = [key for key in keys if isinstance(merged[key], kind)]
            if not names:
                continue
            if kind is Mean:
                packed = torch.stack([torch.stack([merged[k].total, merged[k].count]).float() for k in names])
            else:
                packed = torch.stack([merged[k].value.float() for k in names])
            dist.all_reduce(packed, op=op, group=state.dp_group)
            for index, key in enumerate(names):
                merged[key] = Mean(*packed[index]) if kind is Mean else kind(packed[index])
        result = [finalize(merged)]
    if state.pipeline_parallel > 1:
        dist.broadcast_object_list(result, src=dist.get_global_rank(state.pp_group, state.pipeline_parallel - 1),
                                   group=state.pp_group)
    return result[0]
