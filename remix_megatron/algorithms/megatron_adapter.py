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
import itertools
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
class Packing:
    """Where the ``rows`` of a packed (THD) micro-batch lie in its one ``[1, T]`` sequence: row
    ``i`` is positions ``cu_seqlens[i]:cu_seqlens[i + 1]``; a last entry past the rows is filler
    that makes ``T`` a multiple of TP (attended by nothing else, never unpacked)."""

    cu_seqlens: torch.Tensor  # int32 [sequences + 1]
    rows: int
    width: int  # the padded width the rows unpack to

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, T]`` per-token values -> ``[rows, width]``, 0 past each row's end."""
        flat = packed.reshape(-1)
        out = flat.new_zeros(self.rows, self.width)
        for row, (start, stop) in enumerate(zip(self.cu_seqlens.tolist()[: self.rows], self.cu_seqlens.tolist()[1:])):
            out[row, : stop - start] = flat[start:stop]
        return out

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """``[1, T]``: positions restart at 0 in every sequence."""
        bounds = self.cu_seqlens.tolist()
        return torch.cat([torch.arange(b - a, device=device) for a, b in zip(bounds, bounds[1:])]).unsqueeze(0)

    def params(self, device: torch.device):
        """Megatron's ``PackedSeqParams`` (THD) for TransformerEngine's attention."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(device=device, dtype=torch.int32)
        longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                               max_seqlen_kv=longest)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: model inputs plus what the actor or critic loss needs. Packed (``packing``
    set), ``tokens`` and ``labels`` are ``[1, T]`` and the loss inputs stay ``[rows, width]``."""

    tokens: torch.Tensor  # [b, s] input token ids
    labels: torch.Tensor  # [b, s] the token emitted at each position (tokens shifted by one)
    actor: ActorLossInputs | None = None
    critic: CriticTargets | None = None
    packing: Packing | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, width)`` of its per-token results."""
        return (self.packing.rows, self.packing.width) if self.packing is not None else tuple(self.tokens.shape)

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: t.to(device)  # noqa: E731
        return MicroBatch(tokens=self.tokens.to(device), labels=self.labels.to(device),
                          actor=_map_record(self.actor, move), critic=_map_record(self.critic, move),
                          packing=self.packing)

    def packed(self, lengths: Sequence[int], multiple: int) -> "MicroBatch":
        """This micro-batch with its rows' first ``lengths`` positions end to end in one sequence
        (THD; the loss inputs unchanged), ``T`` padded to a ``multiple`` by a filler sequence."""
        rows = range(self.tokens.size(0))
        tokens = [self.tokens[row, :n] for row, n in zip(rows, lengths)]
        labels = [self.labels[row, :n] for row, n in zip(rows, lengths)]
        bounds = [0, *itertools.accumulate(lengths)]
        filler = -bounds[-1] % multiple
        if filler:
            tokens.append(self.tokens.new_zeros(filler))
            labels.append(self.labels.new_zeros(filler))
            bounds.append(bounds[-1] + filler)
        return replace(self, tokens=torch.cat(tokens).unsqueeze(0), labels=torch.cat(labels).unsqueeze(0),
                       packing=Packing(cu_seqlens=torch.tensor(bounds, dtype=torch.int32), rows=len(lengths),
                                       width=self.tokens.size(1)))

    def unpacked(self, per_token: torch.Tensor) -> torch.Tensor:
        """A ``[b, s]`` forward result as it is (padded), or a packed one as ``[rows, width]``."""
        return per_token if self.packing is None else self.packing.unpack(per_token)

    def take(self, rows: Sequence[int], width: int) -> "MicroBatch":
        """These rows, cut to their first ``width`` positions (``sample_age`` is per row)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        cut = lambda t: t[index, :width] if t.dim() == 2 else t[index]  # noqa: E731
        return MicroBatch(tokens=cut(self.tokens), labels=cut(self.labels), actor=_map_record(self.actor, cut),
                          critic=_map_record(self.critic, cut))

    def widened(self, width: int) -> "MicroBatch":
        """Its ``[b, s]`` tensors right-padded with zeros to ``width`` positions (no loss there)."""
        extra = width - self.tokens.size(1)
        if extra <= 0:
            return self
        pad = lambda t: F.pad(t, (0, extra)) if t.dim() == 2 else t  # noqa: E731
        return MicroBatch(tokens=pad(self.tokens), labels=pad(self.labels), actor=_map_record(self.actor, pad),
                          critic=_map_record(self.critic, pad))

    @staticmethod
    def concat(batches: Sequence["MicroBatch"]) -> "MicroBatch":
        """All rows of ``batches`` (of one width) as one micro-batch."""
        def joined(records):
            if records[0] is None:
                return None
            parts = {f.name: [getattr(r, f.name) for r in records] for f in fields(records[0])}
            return type(records[0])(**{name: None if values[0] is None else torch.cat(values)  # a pass not run
                                       for name, values in parts.items()})

        return MicroBatch(tokens=torch.cat([b.tokens for b in batches]), labels=torch.cat([b.labels for b in batches]),
                          actor=joined([b.actor for b in batches]), critic=joined([b.critic for b in batches]))


def _map_record(record, function):
    """Apply ``function`` to every tensor field of a record dataclass (None stays None, also as a field)."""
    if record is None:
        return None
    return type(record)(**{f.name: None if getattr(record, f.name) is None else function(getattr(record, f.name))
                           for f in fields(record)})


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
    """Run Megatron's forward(-backward) schedule; returns the last stage's logging dicts.
    Micro-batches may differ in rows and width (token-budget batching). The schedule gets this
    layout's groups explicitly (it hands them on to ``finalize_model_grads``); without them it
    rebuilds both from Megatron's globals.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    if not micro_batches:
        raise ValueError("no micro-batches to run")
    batch_size, seq_length = micro_batches[0].tokens.shape
    device = state.runtime.device
    # Pipeline stages receive into buffers of one [seq, batch, hidden] shape per call unless the
    # config says shapes vary; then each send is preceded by its shape (an extra small p2p).
    get_model_config(chunks[0]).variable_seq_lengths = len({tuple(b.tokens.shape) for b in micro_batches}) > 1
    masks: dict[int, torch.Tensor] = {}

    autocast = state.runtime.autocast_dtype is not None

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(device)
        if batch.packing is not None:  # THD: attention within each sequence, no mask, no padding
            output = model(batch.tokens, batch.packing.position_ids(device), None,
                           packed_seq_params=batch.packing.params(device))
        else:
            rows, width = batch.tokens.shape
            if width not in masks:
                masks[width] = _causal_mask(width, device)
            position_ids = torch.arange(width, device=device).unsqueeze(0).expand(rows, -1)
            output = model(batch.tokens, position_ids, masks[width])
        return output, _in_fp32(build_loss(batch), device.type) if autocast else build_loss(batch)

    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    schedule = get_forward_backward_func(pp_size=state.pipeline_parallel,
                                         vp_size=state.virtual_pipeline if state.virtual_pipeline > 1 else None)
    p2p = P2PCommunicator(pp_group=state.pp_group, config=chunks[0].config)  # unused without pipelining
    # The backward runs under autocast too: Megatron's linear backward multiplies the bf16 output
    # gradient by the fp32 weight it saved and restores only CUDA's autocast state (custom_bwd).
    with torch.no_grad() if forward_only else torch.enable_grad(), _autocast(state):
        return schedule(
            forward_step_func=forward_step, data_iterator=iterators, model=list(chunks),
            num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=batch_size,
            forward_only=forward_only, p2p_communicator=p2p, pg_collection=state.pg_collection)


def actor_loss_builder(cfg: AlgorithmConfig, state: ParallelState, *, kl_lambda: float,
                       behaviour_from_forward: bool = False) -> LossBuilder:
    """Loss functions for an actor update with the configured ReMix/PPO/GRPO loss.

    ``behaviour_from_forward``: the batch is pi_k's own samples trained in a single optimizer
    step, so the behaviour (and pi_k) log-probs are this forward's own, detached: the ratio is
    exactly 1 and no separate pass computes them."""

    def loss_func(batch: MicroBatch, logits: torch.Tensor):
        logprobs, entropy = map(batch.unpacked, vocab_parallel_logprobs_entropy(logits, batch.labels, state.tp_group))
        inputs, extra = batch.actor, {}
        if behaviour_from_forward:  # what the batch carries as behaviour is the engine's: the sync check
            own = logprobs.detach().to(inputs.behaviour_logprobs.dtype) * inputs.loss_mask
            extra["engine_logprob_gap"] = Mean.of((own - inputs.behaviour_logprobs).abs(), inputs.loss_mask)
            inputs = replace(inputs, behaviour_logprobs=own, pik_logprobs=own)
        result = actor_loss(logprobs, entropy, inputs, cfg, kl_lambda=kl_lambda)
        return result.numerator, result.denominator, {"metrics": {**result.metrics, **extra}}

    return lambda batch: partial(loss_func, batch)


def critic_loss_builder(cfg: AlgorithmConfig) -> LossBuilder:
    """Loss functions for a critic update (clipped value loss)."""

    def loss_func(batch: MicroBatch, values: torch.Tensor):
        targets = batch.critic
        result = critic_loss(batch.unpacked(values.squeeze(-1).float()), targets.old_values, targets.returns,
                             targets.loss_mask, cfg)
        return result.numerator, result.denominator, {"metrics": result.metrics}

    return lambda batch: partial(loss_func, batch)


def _zero_loss(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.new_zeros(()), torch.zeros((), dtype=torch.int, device=reference.device)


def _logprob_builder(state: ParallelState) -> LossBuilder:
    def loss_func(batch: MicroBatch, logits: torch.Tensor):
        logprobs, entropy = map(batch.unpacked, vocab_parallel_logprobs_entropy(logits, batch.labels, state.tp_group))
        return (*_zero_loss(logprobs), {"logprobs": logprobs, "entropy": entropy})

    return lambda batch: partial(loss_func, batch)


def _value_builder() -> LossBuilder:
    def loss_func(batch: MicroBatch, values: torch.Tensor):
        values = batch.unpacked(values.squeeze(-1).float())
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


def _stacked(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """``[rows, w_i]`` parts right-padded with 0 to ``width`` and stacked: ``[sum of rows, width]``."""
    return torch.cat([F.pad(part.float(), (0, width - part.size(1))) for part in parts])


def _output_shape(micro_batches: Sequence[MicroBatch]) -> tuple[int, int]:
    """``(rows, widest)`` of the micro-batches: the shape of a per-token forward result."""
    return sum(b.shape[0] for b in micro_batches), max(b.shape[1] for b in micro_batches)


def forward_logprobs(chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch], state: ParallelState
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logprobs, entropy)``, ``[rows of micro_batches, widest]`` (0 right of a
    narrower micro-batch), on every rank."""
    logs = run_pipeline(chunks, micro_batches, _logprob_builder(state), state, forward_only=True)
    shape = _output_shape(micro_batches)
    local = [_stacked([log[key] for log in logs], shape[1]) for key in ("logprobs", "entropy")] if logs else None
    logprobs, entropy = broadcast_from_last_stage(local, [shape, shape], state)
    return logprobs, entropy


def forward_values(chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch], state: ParallelState
                   ) -> torch.Tensor:
    """Per-token critic values ``[rows of micro_batches, widest]`` on every rank."""
    logs = run_pipeline(chunks, micro_batches, _value_builder(), state, forward_only=True)
    shape = _output_shape(micro_batches)
    local = [_stacked([log["values"] for log in logs], shape[1])] if logs else None
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
