"""The learning half of one iteration, after its batch is packed: the batch's forward passes and
loss inputs (``prepare``), then the UTD passes of actor and critic optimizer steps over its
minibatches through Megatron's forward-backward schedule (``learn``). The trainer and the smoke
run (``remix-megatron smoke``) both call these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from remix_megatron.algorithms import kl_lambda, learning_rate
from remix_megatron.algorithms.drift import adapt_lr_scale, fresh_drift, replay_drift
from remix_megatron.algorithms.kl import kl_weights
from remix_megatron.algorithms.megatron_adapter import (
    MicroBatch,
    actor_loss_builder,
    critic_loss_builder,
    reduce_metrics,
    run_pipeline,
)
from remix_megatron.batching import (
    PolicyForwards,
    TrainingBatch,
    batch_forwards,
    budget_minibatches,
    estimate_advantages,
    micro_batch_group,
    minibatches,
    training_micro_batches,
)
from remix_megatron.config import AlgorithmConfig, ExperimentConfig
from remix_megatron.parallel import ParallelState
from remix_megatron.policies import Models, copy_weights


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had NaN/inf gradients."""


def utd_passes(micro_batches: list, *, utd: int, steps: int, seed: Sequence[int], state: ParallelState,
               max_tokens: int = 0, multiple: int = 8, packed: bool = False, balance: bool = False) -> list[list]:
    """Every minibatch once per UTD pass, in a fresh seeded order each pass: the minibatches of all
    passes. With ``max_tokens`` each minibatch holds the same rows, regrouped under that budget
    (widths rounded up to ``multiple``; ``packed``: rows end to end, lengths a multiple), and
    with ``balance`` the same rows over all DP ranks, moved so the ranks' tokens even out."""
    group = micro_batch_group(state)
    if not max_tokens:
        return [minibatch for utd_pass in range(utd)
                for minibatch in minibatches(micro_batches, steps, (*seed, utd_pass, state.dp_rank), group)]
    parts = [part for utd_pass in range(utd)
             for part in minibatches(micro_batches, steps, (*seed, utd_pass, state.dp_rank))]
    return budget_minibatches(parts, max_tokens, multiple, state, packed=packed, balance=balance)


def update(model, passes: list[list], builder, state: ParallelState, counters: dict, limit: int, name: str, *,
           apply: bool = True, after_backward: Callable[[int], None] | None = None) -> dict[str, float]:
    """One optimizer step per minibatch; a step with non-finite gradients is skipped, and ``limit``
    in a row stop the run. Returns the metrics merged over all its minibatches (every UTD pass).

    ``apply=False`` (the no_update control) computes losses and gradients and discards them.
    ``after_backward(i)`` runs once minibatch ``i``'s gradients are reduced, before its step.
    """
    logs, norms, skipped = [], [], 0
    for index, batches in enumerate(passes):
        model.zero_grad()
        logs += run_pipeline(model.chunks, batches, builder, state, forward_only=False)
        if after_backward is not None:
            after_backward(index)
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
                   step_skipped=float(skipped), optimizer_steps=float(len(passes)))
    return metrics


@dataclass(frozen=True)
class PreparedBatch:
    """What the iteration's updates train on: fixed before the first of them."""

    forwards: PolicyForwards
    drift: dict[str, float]  # drift/* of the batch before its updates
    actor: list[MicroBatch]  # with their actor loss inputs
    critic: list[MicroBatch] | None  # with their value targets (None without a critic)


@dataclass(frozen=True)
class LearnedMetrics:
    kl_lambda: float
    actor: dict[str, float]
    critic: dict[str, float]  # empty without a critic


def prepare(k: int, batch: TrainingBatch, models: Models, cfg: ExperimentConfig, state: ParallelState
            ) -> PreparedBatch:
    """pi_k / ref / prev log-probs and values on the batch and its drift metrics; then prev takes
    pi_k (for iteration k+1), and the advantages give the micro-batches their loss inputs.

    A reference or precedent pass whose KL weight at k is 0 does not run (unless
    ``trainer.log_unused_kl``; drift control needs the precedent)."""
    alg, trainer = cfg.algorithm, cfg.trainer
    ref_weight, prev_weight = kl_weights(alg.kl_coef, alg.kl_convex, kl_lambda(k, alg))
    every = trainer.log_unused_kl
    forwards = batch_forwards(batch, actor=models.actor.chunks, ref=models.ref if ref_weight > 0 or every else None,
                              prev=models.prev if prev_weight > 0 or every or alg.drift_control else None,
                              critic=models.critic.chunks if models.critic is not None else None,
                              micro_batch_size=trainer.micro_batch_size, state=state,
                              max_tokens=trainer.max_tokens_per_micro_batch, packed=trainer.packed_sequences,
                              balance=trainer.balance_data_parallel)
    drift = drift_metrics(batch, forwards, alg, state)
    copy_weights(models.actor.unwrapped(), models.prev)
    estimate = estimate_advantages(batch, forwards, alg, state)
    actor, critic = training_micro_batches(batch, forwards, estimate, trainer.micro_batch_size, alg)
    return PreparedBatch(forwards=forwards, drift=drift, actor=actor, critic=critic)


def learn(k: int, prepared: PreparedBatch, batch: TrainingBatch, models: Models, cfg: ExperimentConfig,
          state: ParallelState, counters: dict, *, utd: int, behaviour_from_forward: bool = False,
          after_backward: Callable[[str, int], None] | None = None) -> LearnedMetrics:
    """Iteration k's optimizer steps: ``utd`` passes of ``batch.steps`` minibatches each, of the
    actor and then the critic, at the learning rates of k. The advantages and value targets are
    fixed for the iteration, so the two do not affect each other's updates; each runs all its
    passes in one go. ``behaviour_from_forward``: a single on-policy pass whose training forward
    gives its own behaviour log-probs (see ``batching.single_on_policy_pass``).
    ``after_backward(name, i)`` sees each model's gradients of minibatch ``i`` before its step."""
    alg, trainer = cfg.algorithm, cfg.trainer
    weight = kl_lambda(k, alg)
    set_learning_rates(k, models, prepared.drift, cfg, counters)
    apply, limit, seed = trainer.control != "no_update", trainer.max_skipped_steps, (trainer.seed, k)
    budget = dict(max_tokens=trainer.max_tokens_per_micro_batch, multiple=batch.rows.multiple,
                  packed=trainer.packed_sequences, balance=trainer.balance_data_parallel)

    def run(name: str, model, batches: list[MicroBatch], builder) -> dict[str, float]:
        hook = None if after_backward is None else lambda index: after_backward(name, index)
        passes = utd_passes(batches, utd=utd, steps=batch.steps, seed=seed, state=state, **budget)
        return update(model, passes, builder, state, counters, limit, name, apply=apply, after_backward=hook)

    actor = run("actor", models.actor, prepared.actor,
                actor_loss_builder(alg, state, kl_lambda=weight, behaviour_from_forward=behaviour_from_forward))
    critic = {}
    if prepared.critic is not None:
        critic = run("critic", models.critic, prepared.critic, critic_loss_builder(alg))
    return LearnedMetrics(kl_lambda=weight, actor=actor, critic=critic)


def drift_metrics(batch: TrainingBatch, forwards: PolicyForwards, alg: AlgorithmConfig, state: ParallelState
                  ) -> dict[str, float]:
    """drift/* of the batch before its updates (see algorithms.drift), over every DP rank. On fresh rows
    prev is pi_{k-1} and pi_k is their behaviour log-prob; on replayed rows pi_k was computed. Without
    a precedent pass (its weight 0) the fresh-row drift is not measured."""
    rows = batch.rows
    fresh = fresh_drift(forwards.pik, forwards.prev, rows.mask, batch.ages) if forwards.prev is not None else {}
    drift = {**fresh,
             **replay_drift(forwards.pik, rows.behaviour, rows.mask, batch.ages, max_age=alg.replay_window,
                            eps_low=alg.clip_eps_low, eps_high=alg.clip_eps_high)}
    return reduce_metrics([{"metrics": drift}], state)


def set_learning_rates(k: int, models: Models, drift: dict, cfg: ExperimentConfig, counters: dict) -> None:
    """The schedule's lr for iteration k; the actor's scaled by drift control, which adapts first
    (the TV measured now is the move of the last update)."""
    alg = cfg.algorithm
    if alg.drift_control:
        counters["actor_lr_scale"] = adapt_lr_scale(
            counters.get("actor_lr_scale", 1.0), drift["drift/tv_prev_fresh"], low=alg.drift_tv_low,
            high=alg.drift_tv_high, factor=alg.drift_lr_factor, min_scale=alg.drift_lr_min_scale)
    for model, optim, scale in ((models.actor, cfg.actor_optimizer, counters.get("actor_lr_scale", 1.0)),
                                (models.critic, cfg.critic_optimizer, 1.0)):
        if model is not None:
            model.set_lr(scale * learning_rate(k, cfg.trainer.num_steps, optim.lr, optim.lr_decay, optim.min_lr_ratio))
