"""Advantage estimators: GAE, V-trace-corrected GAE, GRPO group normalisation, whitening.

Per-token tensors are ``[batch, seq]`` and aligned so that position ``t`` holds the reward
``r_t`` for emitting token ``t``, the value ``V(s_t)`` of the state before it, and the
log-probabilities of token ``t``. ``mask`` marks a sequence's response tokens, which are
contiguous; the state after the last one is terminal (value 0).

V-trace-corrected GAE (../shared/REMIX.md section 4), with ``c_t = min(c_bar, pi_k/b)``:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * c_{t+1} * A_{t+1}
    target_t = V_t + c_t * A_t

With every ``c = 1`` (fresh data, or ``c_bar`` not binding at ratio 1) it is ordinary GAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from remix_megatron.config import AlgorithmConfig
from remix_megatron.registry import Registry


def _traces(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, traces: torch.Tensor,
            gamma: float, lam: float) -> torch.Tensor:
    """Backward recursion ``A_t = delta_t + gamma*lam*c_{t+1}*A_{t+1}`` over masked tokens."""
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    next_trace = torch.zeros_like(values[:, 0])
    for t in range(values.size(1) - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = (delta + gamma * lam * next_trace * next_advantage) * mask[:, t]
        advantages[:, t] = current
        next_value, next_advantage, next_trace = values[:, t], current, traces[:, t]
    return advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Returns ``(advantages, returns = V + A)``, 0 off-mask."""
    advantages = _traces(rewards, values, mask, torch.ones_like(values), gamma, lam)
    return advantages, (values + advantages) * mask


def vtrace_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, pik_logprobs: torch.Tensor,
               behaviour_logprobs: torch.Tensor, *, gamma: float, lam: float, c_bar: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with V-trace truncated traces. Returns ``(advantages, value targets)``, 0 off-mask."""
    traces = torch.exp((pik_logprobs - behaviour_logprobs).clamp(max=20.0)).clamp(max=c_bar) * mask
    advantages = _traces(rewards, values, mask, traces, gamma, lam)
    return advantages, (values + traces * advantages) * mask


def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, *, norm_std: bool,
                    eps: float) -> torch.Tensor:
    """Group-normalised outcome advantages broadcast over each response's tokens.

    ``scores [batch]``: one reward per response; ``group_ids [batch]``: responses to the same
    prompt share an id. ``A_i = (s_i - mean_g) / (std_g + eps)`` with the unbiased std
    (``norm_std=False``: ``s_i - mean_g``). A group of one response has no baseline and gets 0.
    """
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    scores = scores.to(torch.float64)
    sums = torch.zeros(counts.numel(), dtype=scores.dtype).index_add_(0, inverse, scores)
    means = sums / counts
    centred = scores - means[inverse]
    squares = torch.zeros_like(sums).index_add_(0, inverse, centred**2)
    stds = (squares / (counts - 1).clamp(min=1)).sqrt()
    if norm_std:  # a group of equal scores has nothing to normalise (0/0 with eps = 0)
        advantages = torch.where(centred == 0, centred, centred / (stds[inverse] + eps))
    else:
        advantages = centred
    advantages = torch.where(counts[inverse] > 1, advantages, torch.zeros_like(advantages))
    return advantages.to(mask.dtype if mask.is_floating_point() else torch.float32).unsqueeze(-1) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over masked tokens (unbiased std); 0 off-mask."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1)
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    return (values - mean) / (variance.sqrt() + eps) * mask


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use; all ``[batch, seq]`` unless noted."""

    rewards: torch.Tensor  # per-token rewards (the outcome on the last response token)
    mask: torch.Tensor  # response tokens
    values: torch.Tensor | None = None  # critic values V(s_t), now
    pik_logprobs: torch.Tensor | None = None  # pi_k on the sampled tokens
    behaviour_logprobs: torch.Tensor | None = None  # the generating policy's
    scores: torch.Tensor | None = None  # [batch] outcome per response (GRPO)
    group_ids: torch.Tensor | None = None  # [batch] prompt group (GRPO)
    stored_advantages: torch.Tensor | None = None  # [batch] GRPO advantage in its own group at collection
    # (advantages, mask) -> whitened: over these tokens by default; the trainer passes one over
    # every data-parallel rank's tokens, so whitening does not depend on the DP split.
    whitener: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class AdvantageOutput:
    advantages: torch.Tensor  # [batch, seq], whitened if configured
    returns: torch.Tensor | None  # [batch, seq] critic targets; None without a critic


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: called as ``estimator(inputs, cfg)``; ``needs_critic`` says whether it reads
    critic values (then the trainer builds, trains and checkpoints a critic, and the planner counts it)."""

    estimate: Callable[[AdvantageInputs, AlgorithmConfig], AdvantageOutput]
    needs_critic: bool

    def __call__(self, inputs: AdvantageInputs, cfg: AlgorithmConfig) -> AdvantageOutput:
        return self.estimate(inputs, cfg)


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def needs_critic(estimator: str) -> bool:
    """Whether ``algorithm.advantage_estimator=estimator`` needs a critic (ValueError when unregistered)."""
    return ADVANTAGE_ESTIMATORS.get(estimator).needs_critic


def _need(inputs: AdvantageInputs, estimator: str, *names: str) -> None:
    missing = [name for name in names if getattr(inputs, name) is None]
    if missing:
        raise ValueError(f"advantage estimator {estimator!r} needs {', '.join(missing)}")


def _whitened(advantages: torch.Tensor, inputs: AdvantageInputs, cfg: AlgorithmConfig) -> torch.Tensor:
    if not cfg.whiten_advantages:
        return advantages
    return (inputs.whitener or whiten)(advantages, inputs.mask)


def _gae_estimator(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> AdvantageOutput:
    _need(inputs, "gae", "values")
    advantages, returns = gae(inputs.rewards, inputs.values, inputs.mask, gamma=cfg.gamma, lam=cfg.lam)
    return AdvantageOutput(advantages=_whitened(advantages, inputs, cfg), returns=returns)


def _vtrace_gae_estimator(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> AdvantageOutput:
    _need(inputs, "vtrace_gae", "values", "pik_logprobs", "behaviour_logprobs")
    advantages, targets = vtrace_gae(inputs.rewards, inputs.values, inputs.mask, inputs.pik_logprobs,
                                     inputs.behaviour_logprobs, gamma=cfg.gamma, lam=cfg.lam, c_bar=cfg.vtrace_c_bar)
    return AdvantageOutput(advantages=_whitened(advantages, inputs, cfg), returns=targets)


def _grpo_estimator(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> AdvantageOutput:
    """Group-normalised outcomes in the batch's groups; ``grpo_replay_advantage: stored`` keeps
    each sample's advantage from its own group at collection instead (not whitened either way)."""
    if cfg.grpo_replay_advantage == "stored":
        _need(inputs, "grpo", "stored_advantages")
        return AdvantageOutput(advantages=inputs.stored_advantages.unsqueeze(-1) * inputs.mask, returns=None)
    _need(inputs, "grpo", "scores", "group_ids")
    advantages = grpo_advantages(inputs.scores, inputs.group_ids, inputs.mask, norm_std=cfg.grpo_norm_std,
                                 eps=cfg.grpo_eps)
    return AdvantageOutput(advantages=advantages, returns=None)


ADVANTAGE_ESTIMATORS.register("gae", AdvantageEstimator(_gae_estimator, needs_critic=True))
ADVANTAGE_ESTIMATORS.register("vtrace_gae", AdvantageEstimator(_vtrace_gae_estimator, needs_critic=True))
ADVANTAGE_ESTIMATORS.register("grpo", AdvantageEstimator(_grpo_estimator, needs_critic=False))
