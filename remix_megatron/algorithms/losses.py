"""The actor's ReMix loss and the critic's value loss, as pure tensor functions.

    actor loss per token = L_pg - entropy_coef * H + kl_coef * L_kl
    L_kl = lambda(t) KL(pi || pi_ref) + (1 - lambda(t)) KL(pi || pi_prev)   (KL-convex)
         = KL(pi || pi_ref)                                                (kl_convex off)

aggregated with the configured mode into ``(numerator, denominator)`` (see aggregation.py).
Inputs are ``[batch, seq]`` except ``sample_age [batch]`` (iterations since the sample was
generated; 0 = fresh). No torch.distributed here: the Megatron adapter brings the
vocab-parallel log-probs in and reduces the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remix_megatron.algorithms.aggregation import aggregate
from remix_megatron.algorithms.kl import kl_convex
from remix_megatron.algorithms.metrics import Max, Mean, Metric, Min
from remix_megatron.algorithms.policy_loss import POLICY_LOSSES
from remix_megatron.algorithms.value_loss import clipped_value_loss
from remix_megatron.config import AlgorithmConfig


@dataclass(frozen=True)
class ActorLossInputs:
    """Stored per-token quantities of a micro-batch, all ``[batch, seq]`` but ``sample_age``."""

    loss_mask: torch.Tensor  # response tokens that count
    advantages: torch.Tensor
    behaviour_logprobs: torch.Tensor  # the generating policy's (actor recomputed at collection)
    pik_logprobs: torch.Tensor  # pi_k at the start of this iteration (= behaviour for fresh samples)
    ref_logprobs: torch.Tensor | None  # reference policy (None: not computed, its KL weight is 0)
    prev_logprobs: torch.Tensor | None  # precedent policy pi_{k-1} (None: not computed, weight 0)
    sample_age: torch.Tensor  # [batch] int, iterations since generation
    mismatch_weights: torch.Tensor | None = None  # engine/trainer correction per token (see mismatch.py)


@dataclass(frozen=True)
class LossResult:
    numerator: torch.Tensor  # differentiable 0-d sum
    denominator: torch.Tensor  # 0-d int: what Megatron divides the summed gradients by
    metrics: dict[str, Metric]


def actor_loss(logprobs: torch.Tensor, entropy: torch.Tensor, inputs: ActorLossInputs, cfg: AlgorithmConfig, *,
               kl_lambda: float) -> LossResult:
    """ReMix actor loss for one micro-batch; ``logprobs``/``entropy`` are the current policy's."""
    mask = inputs.loss_mask.to(logprobs.dtype)
    policy = POLICY_LOSSES.get(cfg.policy_loss)(
        logprobs, inputs.behaviour_logprobs, inputs.pik_logprobs, inputs.advantages,
        eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c)
    weight = kl_lambda if cfg.kl_convex else 1.0
    kl, kl_ref, kl_prev = kl_convex(logprobs, inputs.ref_logprobs, inputs.prev_logprobs, kl_lambda=weight,
                                    estimator=cfg.kl_estimator)
    pg = policy.loss if inputs.mismatch_weights is None else policy.loss * inputs.mismatch_weights
    per_token = pg - cfg.entropy_coef * entropy
    if cfg.kl_coef > 0 and kl is not None:
        per_token = per_token + cfg.kl_coef * kl
    numerator, denominator = aggregate(per_token, mask, cfg.loss_agg, norm_tokens=cfg.loss_agg_norm_tokens)
    metrics: dict[str, Metric] = {
        "pg_loss": Mean.of(policy.loss, mask),
        "clip_frac": Mean.of(policy.clipped.to(mask.dtype), mask),
        "ratio_mean": Mean.of(policy.ratio, mask),
        "ratio_max": Max.of(policy.ratio, mask),
        "clip_centre_mean": Mean.of(policy.centre, mask),
        "entropy": Mean.of(entropy, mask),
        "kl_lambda": Mean(total=logprobs.new_tensor(float(weight)), count=logprobs.new_tensor(1.0)),
        "advantage_mean": Mean.of(inputs.advantages, mask),
        "advantage_max": Max.of(inputs.advantages, mask),
        "advantage_min": Min.of(inputs.advantages, mask),
        "response_length_mean": Mean(total=mask.sum(), count=(mask.sum(-1) > 0).sum().to(mask.dtype)),
    }
    if inputs.mismatch_weights is not None:
        metrics["mismatch_weight_mean"] = Mean.of(inputs.mismatch_weights, mask)
        metrics["mismatch_weight_zero_frac"] = Mean.of((inputs.mismatch_weights == 0).to(mask.dtype), mask)
    for name, value in (("kl_ref", kl_ref), ("kl_prev", kl_prev)):  # only what was computed
        if value is not None:
            metrics[name] = Mean.of(value, mask)
    for age in range(cfg.replay_window + 1):
        aged = mask * (inputs.sample_age == age).to(mask.dtype).unsqueeze(-1)
        metrics[f"ratio_mean/age{age}"] = Mean.of(policy.ratio, aged)
        metrics[f"ratio_max/age{age}"] = Max.of(policy.ratio, aged)
    return LossResult(numerator=numerator, denominator=denominator, metrics=metrics)


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, loss_mask: torch.Tensor,
                cfg: AlgorithmConfig) -> LossResult:
    """Clipped value loss for one micro-batch (``values`` is the critic's current output)."""
    mask = loss_mask.to(values.dtype)
    per_token, clipped = clipped_value_loss(values, old_values, returns, clip=cfg.value_clip)
    numerator, denominator = aggregate(per_token, mask, cfg.loss_agg, norm_tokens=cfg.loss_agg_norm_tokens)
    metrics: dict[str, Metric] = {
        "value_loss": Mean.of(per_token, mask),
        "value_clip_frac": Mean.of(clipped.to(mask.dtype), mask),
        "value_error": Mean.of((values - returns) ** 2, mask),
        "value_mean": Mean.of(values, mask),
        "return_mean": Mean.of(returns, mask),
    }
    return LossResult(numerator=numerator, denominator=denominator, metrics=metrics)
