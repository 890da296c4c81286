"""The ReMix training loop: one iteration reads like the paper's algorithm.

    for k = 1, 2, ...:
        phase(k)                      -> off-policy portion p, UTD, reincarnation (ref <- pi_k)
        rollout(k)                    -> fresh responses of pi_k on the colocated engine, rewards,
                                         behaviour log-probs and values, written to the store
        mixed batch(k)                -> (1-p)B fresh + pB replayed from k-N..k-1
        pi_k / ref / prev log-probs, values, advantages (V-trace GAE | GAE | GRPO)
        UTD passes of actor and critic updates through Megatron's schedules
        metrics, evaluation, checkpoint

Algorithms (ppo, grpo, remix_ppo, remix_grpo) are configs of this one loop. The precedent
policy pi_{k-1} for KL-convex is a model copy: at iteration k it still holds pi_{k-1}, its
log-probs are computed, and then it takes pi_k's weights (before the updates) for k+1.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.algorithms import ADVANTAGE_ESTIMATORS, ActorLossInputs, AdvantageInputs, needs_critic
from remix_megatron.algorithms import evaluation_due, kl_lambda, learning_rate, phase
from remix_megatron.algorithms.advantages import grpo_advantages
from remix_megatron.algorithms.drift import adapt_lr_scale, fresh_drift, malformed, replay_drift
from remix_megatron.algorithms.megatron_adapter import (
    CriticTargets, MicroBatch, actor_loss_builder, critic_loss_builder, forward_logprobs, forward_values,
    reduce_metrics, run_pipeline, split_micro_batches,
)
from remix_megatron.checkpoint import load_checkpoint, save_checkpoint
from remix_megatron.config import ConfigError, ExperimentConfig, config_to_dict, save_config
from remix_megatron.console import iteration_line, say
from remix_megatron.convert.export import export_hf, load_hf_into
from remix_megatron.data import PromptSource, load_records, load_tokenizer
from remix_megatron.evaluation import Benchmark, config_benchmarks, self_reflection
from remix_megatron.evaluation.runner import EvalSettings, evaluate_benchmarks, write_outputs
from remix_megatron.faults import fault_point
from remix_megatron.metrics_log import RunLog
from remix_megatron.models import build_actor, build_critic, make_trainable
from remix_megatron.parallel import ParallelState, init_parallel, world_size_from_env
from remix_megatron.rewards import REWARDS
from remix_megatron.rollout import SamplingParams, get_engine_factory
from remix_megatron.rollout.weight_sync import check_logprob_gap, logprob_gap, sync_weights
from remix_megatron.rundir import check_run_dir, finished_iteration, read_metrics, restore_run
from remix_megatron.store import MixedSampler, Trajectory, open_store
from remix_megatron.validation import validate


@dataclass
class Models:
    actor: object  # TrainableModel
    critic: object | None  # TrainableModel, for GAE-style estimators
    ref: list  # chunks of the reference policy
    prev: list  # chunks of the precedent policy pi_{k-1}

    def named(self) -> dict:
        named = {"actor": self.actor, "ref": self.ref, "prev": self.prev}
        if self.critic is not None:
            named["critic"] = self.critic
        return named


def _copy_weights(source_chunks, target_chunks) -> None:
    """Same layout, same rank: a local copy of every parameter."""
    with torch.no_grad():
        for source, target in zip(source_chunks, target_chunks):
            for (_, s), (_, t) in zip(source.named_parameters(), target.named_parameters()):
                t.copy_(s)


def _build_models(cfg: ExperimentConfig, state: ParallelState) -> Models:
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    critic = None
    if needs_critic(cfg.algorithm.advantage_estimator):
        critic = make_trainable(build_critic(cfg.model, state, seed=cfg.trainer.seed), cfg.critic_optimizer,
                                cfg.parallel, state)
    models = Models(actor=actor, critic=critic, ref=build_actor(cfg.model, state), prev=build_actor(cfg.model, state))
    say("start", f"loading weights from {cfg.model.hf_path}", active=state.rank == 0)
    load_hf_into(cfg.model.hf_path, cfg.model, state, actor=actor.unwrapped(),
                 critic=critic.unwrapped() if critic is not None else None)
    for model in (actor, critic):
        if model is not None:
            model.optimizer.reload_model_params()
    _copy_weights(actor.unwrapped(), models.ref)
    _copy_weights(actor.unwrapped(), models.prev)
    return models


# ------------------------------------------------------------------------------ batching


def _pack(records: list[Trajectory], seq_length: int, pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded ``[b, width]`` tensors; position t predicts labels[t] = tokens[t+1].

    A response token at sequence position j is predicted at position j-1: that is where its
    loss mask, behaviour log-prob, stored value and (for the last one) reward go. ``width``
    is the longest record's length rounded up to ``multiple``, at most ``seq_length``: a
    batch of short responses costs no compute for the padding of the longest possible one.
    """
    b = len(records)
    longest = max((r.prompt_tokens.size + r.response_length - 1 for r in records), default=1)
    seq_length = min(seq_length, -(-longest // multiple) * multiple)
    tokens = torch.full((b, seq_length + 1), pad_id, dtype=torch.long)
    fields = {name: torch.zeros(b, seq_length) for name in ("mask", "behaviour", "old_values", "rewards")}
    for row, record in enumerate(records):
        sequence = np.concatenate([record.prompt_tokens, record.response_tokens])[: seq_length + 1]
        tokens[row, : sequence.size] = torch.from_numpy(sequence.astype(np.int64))
        start = record.prompt_tokens.size - 1
        kept = max(min(record.response_length, seq_length - start), 0)
        if kept == 0:
            continue
        span = slice(start, start + kept)
        fields["mask"][row, span] = 1.0
        fields["behaviour"][row, span] = torch.from_numpy(record.behaviour_logprobs[:kept])
        if record.values is not None:
            fields["old_values"][row, span] = torch.from_numpy(record.values[:kept])
        fields["rewards"][row, start + kept - 1] = record.reward
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), **fields}


def _pack_multiple(state: ParallelState) -> int:
    """Packed widths are multiples of 8 and of TP (sequence parallelism splits the sequence over TP)."""
    return math.lcm(8, state.tensor_parallel)


def _micro_batches(packed: dict, size: int, actor: ActorLossInputs | None = None,
                   critic: CriticTargets | None = None) -> list[MicroBatch]:
    return split_micro_batches(packed["tokens"], packed["labels"], size, actor=actor, critic=critic)


def _pad_rows(records: list, multiple: int, minimum: int = 0) -> tuple[list, int]:
    """Repeat the last record until the count is a multiple, and at least ``minimum`` (the copies are masked out)."""
    real = len(records)
    target = max(real + (-real % multiple), minimum)
    return records + [records[-1]] * (target - real), real


def _minibatch_steps(local_rows: int, cfg: ExperimentConfig, state: ParallelState) -> int:
    """Optimizer steps per UTD pass: the whole (all-rank) batch in minibatches of ``trainer.global_batch_size``."""
    total = torch.tensor([local_rows], dtype=torch.int64)
    dist.all_reduce(total, group=state.dp_group)
    return max(1, math.ceil(int(total.item()) / cfg.trainer.global_batch_size))


def _micro_batch_group(state: ParallelState) -> int:
    """Micro-batches per pipeline run come in multiples of this: with interleaving (VPP > 1)
    Megatron's schedule takes only multiples of PP (and at least PP)."""
    return state.pipeline_parallel if state.virtual_pipeline > 1 else 1


def _masked(batch: MicroBatch) -> MicroBatch:
    """A copy of ``batch`` that contributes nothing: no loss tokens, so no loss, gradient,
    token count or metric (padding for the interleaved schedule)."""
    silent = lambda record: None if record is None else replace(record, loss_mask=torch.zeros_like(record.loss_mask))  # noqa: E731
    return MicroBatch(tokens=batch.tokens, labels=batch.labels, actor=silent(batch.actor), critic=silent(batch.critic))


def _minibatches(micro_batches: list, steps: int, seed: Sequence[int], group: int = 1) -> list[list]:
    """The micro-batches in a seeded random order, cut into ``steps`` nearly equal minibatches;
    each is padded with masked copies to a multiple of ``group`` micro-batches (the same rows
    train in each minibatch whatever the layout)."""
    order = np.random.default_rng(list(seed)).permutation(len(micro_batches)) if steps > 1 else range(len(micro_batches))
    shuffled = [micro_batches[i] for i in order]
    bounds = np.linspace(0, len(shuffled), steps + 1).round().astype(int)
    cut = [shuffled[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [part + [_masked(part[-1])] * (-len(part) % group) for part in cut]


def _global_whiten(advantages: torch.Tensor, mask: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Whiten over the valid tokens of the whole (all-DP) batch."""
    stats = torch.stack([(advantages * mask).sum(), (advantages ** 2 * mask).sum(), mask.sum()]).double()
    dist.all_reduce(stats, group=state.dp_group)
    mean = stats[0] / stats[2].clamp(min=1)
    var = (stats[1] / stats[2].clamp(min=1) - mean ** 2) * stats[2] / (stats[2] - 1).clamp(min=1)
    return ((advantages - mean) / (var.clamp(min=0).sqrt() + 1e-8)).float() * mask


def _positions(records: list[Trajectory], seq_length: int) -> list[slice]:
    """Where each record's response tokens sit in its packed row (see ``_pack``)."""
    out = []
    for record in records:
        start = record.prompt_tokens.size - 1
        out.append(slice(start, start + max(min(record.response_length, seq_length - start), 0)))
    return out


# ------------------------------------------------------------------------------ rollout


def _response_budget(prompts, cfg: ExperimentConfig) -> int:
    """New tokens that fit beside the longest prompt in a ``trainer.seq_length + 1`` sequence."""
    longest = max(len(p.token_ids) for p in prompts)
    return max(1, min(cfg.rollout.max_new_tokens, cfg.trainer.seq_length + 1 - longest))


def _sync(engine, models: Models, cfg: ExperimentConfig, state: ParallelState) -> None:
    """Wake-time weight sync: the actor's current weights into the engine."""
    sync_weights(engine, models.actor.unwrapped(), state, cfg.model, bucket_bytes=cfg.rollout.weight_sync_bucket_mb << 20)


@dataclass
class RolloutResult:
    records: list[Trajectory]  # this DP rank's fresh trajectories
    texts: list[str]
    logprob_gap: float | None


def _behaviour_and_values(records: list[Trajectory], models: Models, cfg: ExperimentConfig, state: ParallelState
                          ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The actor's recomputed log-probs (and the critic's values) on each response."""
    if not records:
        return [], ([] if models.critic is not None else None)
    padded, _ = _pad_rows(records, cfg.trainer.micro_batch_size * _micro_batch_group(state))
    packed = _pack(padded, cfg.trainer.seq_length, pad_id=0, multiple=_pack_multiple(state))
    batches = _micro_batches(packed, cfg.trainer.micro_batch_size)
    logprobs, _ = forward_logprobs(models.actor.chunks, batches, state)
    values = forward_values(models.critic.chunks, batches, state) if models.critic is not None else None
    spans = _positions(records, cfg.trainer.seq_length)
    behaviour = [logprobs[i, span].cpu().numpy() for i, span in enumerate(spans)]
    return behaviour, None if values is None else [values[i, span].cpu().numpy() for i, span in enumerate(spans)]


def _rollout(k: int, prompts, cfg: ExperimentConfig, state: ParallelState, engine, tokenizer, grader, models: Models,
             check_gap: bool) -> RolloutResult:
    """Generate this DP rank's share of ``prompts`` with pi_k, score, recompute, build records."""
    mine = [(index, prompt) for index, prompt in enumerate(prompts) if index % state.data_parallel == state.dp_rank]
    if not mine:
        return RolloutResult(records=[], texts=[], logprob_gap=None)
    params = SamplingParams(n=cfg.rollout.responses_per_prompt, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=_response_budget([p for _, p in mine], cfg),
                            stop_token_ids=(tokenizer.eos_token_id,),
                            seed=cfg.trainer.seed * 1_000_003 + k * 1009 + state.dp_rank)
    generations = engine.generate([p.token_ids.tolist() for _, p in mine], params)
    flat = [(index, prompt, g) for (index, prompt), gs in zip(mine, generations) for g in gs]
    texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for _, _, g in flat]
    scores, _ = grader(texts, [prompt.answer for _, prompt, _ in flat])
    if cfg.trainer.control == "shuffled_rewards":  # a control: rewards no longer follow the responses
        scores = [scores[i] for i in np.random.default_rng([cfg.trainer.seed, k, state.dp_rank]).permutation(len(scores))]
    drafts = [Trajectory(iteration=k, prompt_id=prompt.id, group_id=index, prompt_tokens=prompt.token_ids,
                         response_tokens=g.token_ids, reward=score, behaviour_logprobs=np.zeros(len(g.token_ids)),
                         finish_reason=g.finish_reason, extra={"grpo_advantage": 0.0})
              for (index, prompt, g), score in zip(flat, scores)]
    behaviour, values = _behaviour_and_values(drafts, models, cfg, state)
    group_advantage = grpo_advantages(torch.tensor([d.reward for d in drafts]), torch.tensor([d.group_id for d in drafts]),
                                      torch.ones(len(drafts), 1), norm_std=cfg.algorithm.grpo_norm_std,
                                      eps=cfg.algorithm.grpo_eps)[:, 0].tolist()
    records = []
    for draft, lp, value, advantage in zip(drafts, behaviour, values or [None] * len(drafts), group_advantage):
        kept = lp.size  # responses longer than the sequence budget are cut (counted as 'length')
        records.append(Trajectory(
            iteration=k, prompt_id=draft.prompt_id, group_id=draft.group_id, prompt_tokens=draft.prompt_tokens,
            response_tokens=draft.response_tokens[:kept], reward=draft.reward, behaviour_logprobs=lp,
            finish_reason=draft.finish_reason if kept == draft.response_length else "length", values=value,
            extra={"grpo_advantage": float(advantage)}))
    gap = None
    if check_gap:
        engine_lp = [g.logprobs[: r.response_length] for (_, _, g), r in zip(flat, records) if g.logprobs is not None]
        gap = logprob_gap(engine_lp, [r.behaviour_logprobs for r in records][: len(engine_lp)])
    return RolloutResult(records=records, texts=texts, logprob_gap=gap)


# ------------------------------------------------------------------------------ training batch


def _rows_forward(forward, records: list[Trajectory], needed: torch.Tensor, known: torch.Tensor, mask: torch.Tensor,
                  cfg: ExperimentConfig, state: ParallelState) -> torch.Tensor:
    """``known`` with the rows where ``needed`` replaced by ``forward(micro_batches)`` of those rows
    only; zero outside ``mask``.

    The needed rows are packed on their own (same left alignment as the full batch, so a token
    sits at the same position) and padded to whole micro-batches; nothing runs when none is needed.
    """
    rows = (needed & (mask.sum(-1) > 0)).nonzero().flatten().tolist()  # masked-out padding rows: never
    out = known * mask
    if not rows:
        return out
    subset, real = _pad_rows([records[i] for i in rows], cfg.trainer.micro_batch_size * _micro_batch_group(state))
    packed = _pack(subset, cfg.trainer.seq_length, pad_id=0, multiple=_pack_multiple(state))
    computed = forward(_micro_batches(packed, cfg.trainer.micro_batch_size)).cpu().float()
    width = computed.size(1)
    out[rows, :width] = computed[:real] * mask[rows, :width]
    return out


def _batch_forwards(records: list[Trajectory], ages: torch.Tensor, packed: dict, models: Models,
                    cfg: ExperimentConfig, state: ParallelState, *, reuse_known: bool = True):
    """pi_k, reference and precedent log-probs and critic values on the packed batch.

    Forward passes whose result is already known are skipped (``reuse_known``): pi_k on fresh
    rows is their behaviour log-prob (pi_k generated them; w = 1 exactly); pi_{k-1} on rows of
    age 1 is their behaviour log-prob too (pi_{k-1} generated them and ``models.prev`` holds
    pi_{k-1}); the critic has not moved since it valued this iteration's fresh rows, so their
    values are the stored ones. Only the reference runs on every row. Outside the loss mask
    every result is 0.
    """
    mask = packed["mask"]
    everything = torch.ones_like(ages, dtype=torch.bool)
    replayed = ages > 0 if reuse_known else everything  # pi_k and the critic: fresh rows are known
    not_age1 = ages != 1 if reuse_known else everything  # pi_{k-1}: age-1 rows are known

    def rows(forward, needed, known):
        return _rows_forward(forward, records, needed, known, mask, cfg, state)

    pik = rows(partial(_logprobs_only, models.actor.chunks, state=state), replayed, packed["behaviour"])
    ref = rows(partial(_logprobs_only, models.ref, state=state), everything, torch.zeros_like(mask))
    prev = rows(partial(_logprobs_only, models.prev, state=state), not_age1, packed["behaviour"])
    values = None
    if models.critic is not None:
        values = rows(partial(forward_values, models.critic.chunks, state=state), replayed, packed["old_values"])
    return pik, ref, prev, values


def _logprobs_only(chunks, micro_batches, *, state: ParallelState) -> torch.Tensor:
    return forward_logprobs(chunks, micro_batches, state)[0]


def _group_outcomes(records: list[Trajectory], real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's inputs: each row's reward (the stored one: a response cut to nothing still has it)
    and its group (prompt of one iteration). The padding copies after ``real`` get groups of
    their own, so they do not enter the mean and std of the group they copy."""
    scores = torch.tensor([r.reward for r in records], dtype=torch.float64)
    group_ids = torch.tensor([r.iteration * 1_000_000 + r.group_id if i < real else -1 - i
                              for i, r in enumerate(records)])
    return scores, group_ids


def _drift_metrics(pik: torch.Tensor, prev: torch.Tensor, packed: dict, ages: torch.Tensor, cfg: ExperimentConfig,
                   state: ParallelState) -> dict[str, float]:
    """drift/* of the batch before its updates (see algorithms.drift), over every DP rank. On fresh rows
    prev is pi_{k-1} and pi_k is their behaviour log-prob; on replayed rows pi_k was computed."""
    alg = cfg.algorithm
    drift = {**fresh_drift(pik, prev, packed["mask"], ages),
             **replay_drift(pik, packed["behaviour"], packed["mask"], ages, max_age=alg.replay_window,
                            eps_low=alg.clip_eps_low, eps_high=alg.clip_eps_high)}
    return reduce_metrics([{"metrics": drift}], state)


def _training_batches(k: int, batch, cfg: ExperimentConfig, state: ParallelState, models: Models):
    """pi_k / ref / prev log-probs, values and advantages for this rank's mixed batch, the
    number of minibatch steps per UTD pass (rows are shuffled once, so minibatches mix ages)
    and the batch's drift metrics."""
    steps = _minibatch_steps(len(batch.trajectories), cfg, state)
    order = np.random.default_rng([cfg.trainer.seed, k, state.dp_rank]).permutation(len(batch.trajectories))
    micro = cfg.trainer.micro_batch_size
    records, real = _pad_rows([batch.trajectories[i] for i in order], micro, minimum=steps * micro)
    ages = torch.from_numpy(np.concatenate([batch.ages[order], np.full(len(records) - real, batch.ages[order][-1])]))
    packed = _pack(records, cfg.trainer.seq_length, pad_id=0, multiple=_pack_multiple(state))
    packed["mask"][real:] = 0.0
    pik, ref, prev, values = _batch_forwards(records, ages, packed, models, cfg, state)
    drift = _drift_metrics(pik, prev, packed, ages, cfg, state)
    _copy_weights(models.actor.unwrapped(), models.prev)  # prev now holds pi_k, for iteration k+1
    alg = cfg.algorithm
    if alg.advantage_estimator == "grpo" and alg.grpo_replay_advantage == "stored":
        stored = torch.tensor([r.extra["grpo_advantage"] for r in records], dtype=torch.float32)
        advantages, returns = stored.unsqueeze(-1) * packed["mask"], None
    else:
        scores, group_ids = _group_outcomes(records, real)
        estimate = ADVANTAGE_ESTIMATORS.get(alg.advantage_estimator)(AdvantageInputs(
            rewards=packed["rewards"], mask=packed["mask"], values=values, pik_logprobs=pik,
            behaviour_logprobs=packed["behaviour"], scores=scores, group_ids=group_ids),
            replace(alg, whiten_advantages=False))
        advantages, returns = estimate.advantages, estimate.returns
        if alg.whiten_advantages and needs_critic(alg.advantage_estimator):
            advantages = _global_whiten(advantages, packed["mask"], state)
    actor_inputs = ActorLossInputs(loss_mask=packed["mask"], advantages=advantages.float(),
                                   behaviour_logprobs=packed["behaviour"], pik_logprobs=pik.float(),
                                   ref_logprobs=ref.cpu().float(), prev_logprobs=prev.cpu().float(), sample_age=ages)
    actor_batches = _micro_batches(packed, cfg.trainer.micro_batch_size, actor=actor_inputs)
    critic_batches = None
    if models.critic is not None and returns is not None:
        # The clip centre is the critic as this iteration starts (its trust region), on every row:
        # for fresh rows that is their stored value; for replayed rows the value stored when they
        # were generated is up to N critics old, and a window around it can hold the loss on its
        # clipped, gradient-free side while V-trace's targets come from the current critic.
        targets = CriticTargets(loss_mask=packed["mask"], old_values=values.float(), returns=returns.float())
        critic_batches = _micro_batches(packed, cfg.trainer.micro_batch_size, critic=targets)
    return actor_batches, critic_batches, steps, drift


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had NaN/inf gradients."""


def _update(model, minibatches: list[list], builder, state, counters: dict, limit: int, name: str, *,
            apply: bool = True) -> dict[str, float]:
    """One optimizer step per minibatch; a step with non-finite gradients is skipped, and ``limit``
    in a row stop the run. Returns the metrics merged over all its minibatches (every UTD pass).

    ``apply=False`` (the no_update control) computes losses and gradients and discards them.
    """
    logs, norms, skipped = [], [], 0
    for batches in minibatches:
        model.zero_grad()
        logs += run_pipeline(model.chunks, batches, builder, state, forward_only=False)
        if not apply:
            model.zero_grad()
            skipped += 1
            continue
        applied, grad_norm = model.step()
        norms.append(float(grad_norm if grad_norm is not None else 0.0))
        key = f"skipped_in_a_row/{name}"
        counters[key] = 0 if applied else counters.get(key, 0) + 1
        if counters[key]:
            skipped += 1
            counters["skipped_total"] = counters.get("skipped_total", 0) + 1
            if state.rank == 0:
                print(f"warning: {name} step skipped: non-finite gradients ({counters[key]} in a row)", flush=True)
        if counters[key] >= limit:
            raise NonFiniteLossError(f"{limit} {name} optimizer steps in a row had NaN/inf gradients "
                                     f"(trainer.max_skipped_steps={limit}); stopping. The last checkpoint is intact: "
                                     "lower the learning rate or check the data, then resume.")
    metrics = reduce_metrics(logs, state)
    finite = [n for n in norms if n == n]
    metrics.update(grad_norm=sum(finite) / len(finite) if finite else (float("nan") if norms else 0.0),
                   step_skipped=float(skipped), optimizer_steps=float(len(minibatches)))
    return metrics


# ------------------------------------------------------------------------------ evaluation and logging


def _evaluate(k: int, benchmarks: list[Benchmark], engine, tokenizer, grader, cfg: ExperimentConfig,
              state: ParallelState, models: Models) -> dict[str, float]:
    """Score the current actor on the evaluation sets (split over DP ranks); generations saved per evaluation."""
    start = time.perf_counter()
    say("event", f"evaluation at iteration {k} started: {', '.join(b.name for b in benchmarks)}", active=state.rank == 0)
    engine.wake_up()
    _sync(engine, models, cfg, state)
    metrics = {}
    for benchmark in benchmarks:
        heldout = benchmark.name == "heldout"
        settings = EvalSettings(template=cfg.data.template, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                                max_new_tokens=cfg.rollout.max_new_tokens, context_limit=cfg.trainer.seq_length + 1,
                                overlong=cfg.data.overlong,
                                limit=cfg.data.eval_size if heldout else cfg.data.eval_benchmark_size,
                                seed=cfg.trainer.seed + k, problem_key=cfg.data.problem_key,
                                answer_key=cfg.data.answer_key, id_key=cfg.data.id_key)
        result = evaluate_benchmarks(engine, tokenizer, grader, [benchmark], settings, dp_rank=state.dp_rank,
                                     dp_size=state.data_parallel, dp_group=state.dp_group)
        score = result.scores[0]
        if heldout:
            metrics["eval_accuracy"] = score.score
        else:
            metrics[f"eval/{score.benchmark}"] = score.score
        for key in ("format_rate", "self_reflection_rate", "mean_response_length"):
            metrics[f"eval/{score.benchmark}/{key}"] = getattr(score, key)
        if state.rank == 0 and not heldout:
            write_outputs(result, Path(cfg.trainer.run_dir) / "eval" / f"iter_{k:07d}" / score.benchmark)
    scored = [value for key, value in metrics.items() if key.count("/") == 1]
    if scored:
        metrics["eval/average"] = sum(scored) / len(scored)
    engine.sleep()
    say("event", f"evaluation at iteration {k} finished in {time.perf_counter() - start:.1f} s", active=state.rank == 0)
    return metrics


def _rollout_stats(result: RolloutResult, state: ParallelState) -> dict[str, float]:
    records = result.records
    local = torch.tensor([len(records), sum(r.reward for r in records), sum(r.response_length for r in records),
                          sum(self_reflection(t) for t in result.texts),
                          sum(r.finish_reason == "length" for r in records), sum(map(malformed, result.texts))],
                         dtype=torch.float64)
    dist.all_reduce(local, group=state.dp_group)
    count = local[0].clamp(min=1)
    return {"rollouts": int(local[0].item()), "reward_mean": (local[1] / count).item(),
            "response_length": (local[2] / count).item(), "self_reflection_rate": (local[3] / count).item(),
            "truncated_rate": (local[4] / count).item(), "drift/malformed_rate": (local[5] / count).item()}


# ------------------------------------------------------------------------------ the loop


def _train_source(cfg: ExperimentConfig, tokenizer) -> PromptSource:
    try:
        return PromptSource(load_records(cfg.data.train_path), tokenizer, seed=cfg.trainer.seed, name="train",
                            template=cfg.data.template, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                            overlong=cfg.data.overlong, problem_key=cfg.data.problem_key,
                            answer_key=cfg.data.answer_key, id_key=cfg.data.id_key)
    except ValueError as error:  # the data file or template: one line naming it, not a traceback
        raise ConfigError(f"training data ({cfg.data.train_path}): {error}") from None


def _eval_line(record: dict) -> str:
    parts = [f"held-out {record['eval_accuracy']:.3f}"] if "eval_accuracy" in record else []
    parts += [f"{key[5:]} {value:.3f}" for key, value in record.items() if key.startswith("eval/") and key.count("/") == 1]
    return " | " + ", ".join(parts) if parts else ""


class TrainingStopped(RuntimeError):
    """Training stopped early on a signal, after checkpointing its last complete iteration."""

    def __init__(self, signum: int, iteration: int, checkpointed: bool) -> None:
        self.signum, self.iteration, self.checkpointed = signum, iteration, checkpointed
        saved = ("its checkpoint is saved: resume with trainer.resume=true" if checkpointed
                 else "no checkpoint was saved (trainer.save_interval < 0)")
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; {saved}")


class StopRequest:
    """SIGTERM or SIGUSR1 (Slurm's preemption and time limit, torchrun's shutdown, ``kill``)
    asks the run to stop: the current iteration finishes, every rank agrees at its end, the
    checkpoint of that iteration is saved and ``train`` raises ``TrainingStopped``. Repeats
    while stopping are ignored: under Slurm a worker gets the signal twice, from Slurm (which
    signals every process of the step) and from torchrun (which forwards its own), and must
    still checkpoint. SIGINT (KeyboardInterrupt) or SIGKILL stop a worker at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            print(f"received {signal.Signals(signum).name} again: already stopping after this iteration", flush=True)
            return
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: finishing this iteration, then checkpointing and stopping",
              flush=True)

    def agreed(self) -> int | None:
        """The signal any rank received (all ranks call this at the same point), else None."""
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def train(cfg: ExperimentConfig) -> list[dict]:
    """Run ReMix (or PPO / GRPO, by config) up to ``trainer.num_steps`` iterations; returns the metrics."""
    checked = validate(cfg, world_size_from_env())  # every weight-free check, before anything heavy
    grader = REWARDS.get(cfg.data.reward)()
    state = init_parallel(cfg)
    if state.rank == 0:
        for warning in checked.warnings:
            print(f"warning: {warning}", flush=True)
    resume_from = check_run_dir(cfg, rank=state.rank, barrier=dist.barrier)
    if finished_iteration(cfg, resume_from):
        return _finished(cfg, state, resume_from)
    if state.rank == 0:
        save_config(cfg, Path(cfg.trainer.run_dir) / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.hf_path)
    train_source = _train_source(cfg, tokenizer)
    evaluations = config_benchmarks(cfg.data)
    say("start", f"building models: actor{', critic' if needs_critic(cfg.algorithm.advantage_estimator) else ''}"
        f", reference, precedent ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"TP{state.tensor_parallel} x PP{state.pipeline_parallel} x DP{state.data_parallel})", active=state.rank == 0)
    models = _build_models(cfg, state)
    run_dir, checkpoints = Path(cfg.trainer.run_dir), cfg.trainer.checkpoint_root
    store = open_store(cfg.store.path or run_dir / "store", create=True, extra_columns=["grpo_advantage"],
                       cleanup=state.rank == 0, row_group_size=cfg.store.row_group_size,
                       compression=cfg.store.compression) if state.rank == 0 else None
    dist.barrier()
    store = store or open_store(cfg.store.path or run_dir / "store", row_group_size=cfg.store.row_group_size,
                                compression=cfg.store.compression)
    sampler = MixedSampler.from_config(cfg, groups_per_step=cfg.rollout.prompts_per_step)
    counters = {"rollouts": 0}
    first = 1
    if resume_from is not None:
        payload = load_checkpoint(checkpoints, models.named(), state, iteration=resume_from)
        first = payload["iteration"] + 1
        say("event", f"resumed from iteration {payload['iteration']} ({checkpoints})", active=state.rank == 0)
        saved = payload["trainer_state"]
        train_source.load_state_dict(saved["prompts"])
        counters["rollouts"] = saved["rollouts"]
        counters["actor_lr_scale"] = saved.get("actor_lr_scale", 1.0)
    # The store and metrics.jsonl match the checkpoint again (or are empty without one).
    history = _shared_history(restore_run(cfg, store, resume_from) if state.rank == 0 else [])
    say("start", f"starting the {cfg.rollout.engine} generation engine", active=state.rank == 0)
    engine = get_engine_factory(cfg.rollout.engine)(cfg.rollout, cfg.model, state, cfg.model.hf_path,
                                                     seed=cfg.trainer.seed)
    log = RunLog(run_dir, active=state.rank == 0, trainer=cfg.trainer, config=config_to_dict(cfg),
                 first_iteration=first)
    if evaluations and first == 1 and (cfg.data.eval_interval or cfg.data.eval_every_rollouts):
        history.append({"iteration": 0, "rollouts_total": 0,
                        **_evaluate(0, evaluations, engine, tokenizer, grader, cfg, state, models)})
        log.write(history[-1])
        if state.rank == 0:
            print(f"[0/{cfg.trainer.num_steps}] before training: {_eval_line(history[-1])[3:]}", flush=True)
    stop, stopped = StopRequest(), None
    with stop:
        for k in range(first, cfg.trainer.num_steps + 1):
            record = _iteration(k, cfg, state, models, engine, tokenizer, grader, train_source, store, sampler,
                                counters)
            stopped = stop.agreed()
            if evaluations and not stopped and evaluation_due(
                    k, cfg.trainer.num_steps, record["rollouts_total"] - record["rollouts"], record["rollouts_total"],
                    every_steps=cfg.data.eval_interval, every_rollouts=cfg.data.eval_every_rollouts):
                record.update(_evaluate(k, evaluations, engine, tokenizer, grader, cfg, state, models))
            _report(k, record, cfg, state, history, log)  # before the checkpoint: a resume finds every record
            fault_point("metrics_written", k)
            interval = cfg.trainer.save_interval
            if interval >= 0 and (k == cfg.trainer.num_steps or (interval and k % interval == 0) or stopped):
                saved_to = save_checkpoint(checkpoints, k, models.named(), state,
                                {"prompts": train_source.state_dict(), "rollouts": counters["rollouts"],
                                 "reincarnated": record["reincarnated"],
                                 "actor_lr_scale": counters.get("actor_lr_scale", 1.0)}, config=cfg,
                                keep_last=cfg.trainer.keep_checkpoints)
                fault_point("checkpoint_saved", k)
                say("event", f"checkpoint of iteration {k} saved: {saved_to}", active=state.rank == 0)
            if stopped:
                break
    engine.shutdown()
    for path in log.close(history):
        print(f"plot: {path}", flush=True)
    if stopped:
        raise TrainingStopped(stopped, k, checkpointed=cfg.trainer.save_interval >= 0)
    export_hf(models.actor.unwrapped(), state, cfg.model, run_dir / "hf_actor", source_hf_dir=cfg.model.hf_path)
    if state.rank == 0:
        print(f"final actor exported to {run_dir / 'hf_actor'}", flush=True)
    return history


def _shared_history(records: list[dict]) -> list[dict]:
    """Rank 0's metrics records (read from metrics.jsonl) on every rank."""
    shared = [records]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _finished(cfg: ExperimentConfig, state: ParallelState, iteration: int) -> list[dict]:
    """A rerun of a finished run: say so and return its metrics, without building or exporting anything."""
    history = _shared_history(read_metrics(Path(cfg.trainer.run_dir) / "metrics.jsonl") if state.rank == 0 else [])
    if state.rank == 0:
        print(f"{cfg.trainer.run_dir} is finished: checkpoint of iteration {iteration} (trainer.num_steps="
              f"{cfg.trainer.num_steps}), actor exported to {Path(cfg.trainer.run_dir) / 'hf_actor'}. Nothing to do; "
              "raise trainer.num_steps to continue it", flush=True)
    return history


def _report(k: int, record: dict, cfg: ExperimentConfig, state: ParallelState, history: list, log: RunLog) -> None:
    """Keep, log and print one iteration's metrics (``trainer.console_metrics``), and its events."""
    history.append(record)
    log.write(record)
    if state.rank == 0:
        if k == cfg.algorithm.reincarnation_step + 1 and cfg.algorithm.reincarnation_step:
            say("event", f"policy reincarnation after step {k - 1}: the reference is now that policy; on-policy "
                         f"from iteration {k} (UTD {record['utd']})")
        print(iteration_line(k, cfg.trainer.num_steps, record, cfg.trainer.console_metrics) + _eval_line(record),
              flush=True)


def _iteration(k: int, cfg: ExperimentConfig, state: ParallelState, models: Models, engine, tokenizer, grader,
               train_source, store, sampler: MixedSampler, counters: dict) -> dict:
    """One ReMix iteration; returns its metrics."""
    timer, times = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal timer
        now = time.perf_counter()
        times[f"time/{name}_s"] = now - timer
        timer = now

    current = phase(k, cfg.algorithm)
    if current.reset_reference:  # policy reincarnation: the reference becomes pi_T
        _copy_weights(models.actor.unwrapped(), models.ref)
    engine.wake_up()
    _sync(engine, models, cfg, state)
    lap("sync")
    fresh = sampler.fresh_to_generate(store, k, current.off_policy_portion)
    interval = cfg.rollout.logprob_check_interval
    result = _rollout(k, train_source.next_batch(fresh), cfg, state, engine, tokenizer, grader, models,
                      check_gap=bool(interval) and k % interval == 0)
    engine.sleep()
    lap("generate")
    if result.logprob_gap is not None:
        check_logprob_gap(result.logprob_gap, cfg.rollout.logprob_check_threshold)
    if state.tp_rank == 0 and state.pp_rank == 0:
        store.write_shard(k, state.dp_rank, result.records)
    dist.barrier()
    if state.rank == 0:
        store.publish(k, num_writers=state.data_parallel)
        if cfg.store.keep_iterations:
            store.prune(cfg.store.keep_iterations)
    dist.barrier()
    lap("store")
    batch = sampler.sample(store, k, current.off_policy_portion, dp_rank=state.dp_rank, dp_size=state.data_parallel)
    weight = kl_lambda(k, cfg.algorithm)
    actor_batches, critic_batches, steps, drift = _training_batches(k, batch, cfg, state, models)
    lap("logprobs")
    builder = actor_loss_builder(cfg.algorithm, state, kl_lambda=weight)
    limit = cfg.trainer.max_skipped_steps
    apply = cfg.trainer.control != "no_update"
    alg = cfg.algorithm
    if alg.drift_control:  # the TV measured now is the move of the last update: adapt before this one
        counters["actor_lr_scale"] = adapt_lr_scale(
            counters.get("actor_lr_scale", 1.0), drift["drift/tv_prev_fresh"], low=alg.drift_tv_low,
            high=alg.drift_tv_high, factor=alg.drift_lr_factor, min_scale=alg.drift_lr_min_scale)
    for model, optim, scale in ((models.actor, cfg.actor_optimizer, counters.get("actor_lr_scale", 1.0)),
                                (models.critic, cfg.critic_optimizer, 1.0)):
        if model is not None:
            model.set_lr(scale * learning_rate(k, cfg.trainer.num_steps, optim.lr, optim.lr_decay, optim.min_lr_ratio))
    # UTD passes: every minibatch once per pass, in a fresh order each time. The advantages and
    # value targets are fixed for the iteration, so the actor and the critic do not affect each
    # other's updates: each runs all its passes in one go, and its metrics cover all of them.
    group = _micro_batch_group(state)

    def passes(batches):
        return [minibatch for utd_pass in range(current.utd)
                for minibatch in _minibatches(batches, steps, (cfg.trainer.seed, k, utd_pass, state.dp_rank), group)]

    actor_metrics = _update(models.actor, passes(actor_batches), builder, state, counters, limit, "actor", apply=apply)
    critic_metrics = _update(models.critic, passes(critic_batches), critic_loss_builder(cfg.algorithm), state, counters,
                             limit, "critic", apply=apply) if critic_batches is not None else {}
    lap("update")
    stats = _rollout_stats(result, state)
    counters["rollouts"] += stats["rollouts"]
    record = {"iteration": k, "rollouts_total": counters["rollouts"], "reincarnated": current.reincarnated,
              "off_policy_portion": current.off_policy_portion, "utd": current.utd, "kl_lambda": weight, "actor/lr": models.actor.optimizer.param_groups[0]["lr"],
              "replayed_groups": batch.plan.num_replayed, "fresh_groups": batch.plan.num_fresh, **stats,
              **{f"actor/{key}": value for key, value in actor_metrics.items()},
              **{f"critic/{key}": value for key, value in critic_metrics.items()}, **drift, **times}
    if result.logprob_gap is not None:
        record["engine_logprob_gap"] = result.logprob_gap
    record["time/iteration_s"] = sum(times.values())
    return record
