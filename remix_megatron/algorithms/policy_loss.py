"""Policy-gradient surrogates: PPO's clipped objective and Mix-PPG's generalised clip.

Per token, with behaviour policy ``b`` (the policy that generated the sample), the policy
being trained ``pi`` and the policy ``pi_k`` at the start of this iteration:

    r = pi / b,   w = pi_k / b   (clip centre; 1 for fresh samples, where b = pi_k)
    L = -min(r * A, clip(r, w - eps_low, w + eps_high) * A)

``ppo`` centres the window at 1 (plain PPO; importance ratio against the behaviour policy),
``mix_ppg`` at ``w`` (GePPO's generalised clipping, ../shared/REMIX.md section 1). With every
sample fresh the two are identical. Dual clip (Ye et al. 2020) bounds the loss of
negative-advantage tokens by ``-c * w * A``: the same bound as PPO's ``-c * A`` in the
equivalent view ``w * PPO(pi / pi_k)``.

Shapes: every tensor is ``[batch, seq]``; log-probs are per-token log-probabilities of the
sampled tokens. Padding is handled by the caller's aggregation mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from remix_megatron.registry import Registry

#: log-ratios are clamped before exp so that one wild token cannot produce inf/NaN.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class PolicyLossOutput:
    """Per-token results, all ``[batch, seq]``."""

    loss: torch.Tensor  # the negated surrogate
    ratio: torch.Tensor  # pi / b (detached)
    clipped: torch.Tensor  # bool: the clip (or dual clip) bound is the active branch
    centre: torch.Tensor  # the clip centre w (detached)


def _ratio(log_num: torch.Tensor, log_den: torch.Tensor) -> torch.Tensor:
    return torch.exp((log_num - log_den).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def clipped_surrogate(ratio: torch.Tensor, centre: torch.Tensor, advantages: torch.Tensor, *,
                      eps_low: float, eps_high: float, dual_clip_c: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, clipped)`` for a clip window ``[centre - eps_low, centre + eps_high]``."""
    unclipped = ratio * advantages
    bounded = torch.maximum(torch.minimum(ratio, centre + eps_high), centre - eps_low) * advantages
    surrogate = torch.minimum(unclipped, bounded)
    clipped = bounded < unclipped
    if dual_clip_c > 0:
        floor = dual_clip_c * centre * advantages
        dual = (advantages < 0) & (surrogate < floor)
        surrogate = torch.where(dual, floor, surrogate)
        clipped = clipped | dual
    return -surrogate, clipped


PolicyLoss = Callable[..., PolicyLossOutput]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def ppo_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, pik_logprobs: torch.Tensor,
             advantages: torch.Tensor, *, eps_low: float, eps_high: float,
             dual_clip_c: float = 0.0) -> PolicyLossOutput:
    """PPO's clipped surrogate with the ratio against the behaviour policy, window around 1."""
    del pik_logprobs  # plain PPO ignores how far the behaviour policy is from pi_k
    ratio = _ratio(logprobs, behaviour_logprobs)
    centre = torch.ones_like(ratio)
    loss, clipped = clipped_surrogate(ratio, centre, advantages, eps_low=eps_low, eps_high=eps_high,
                                      dual_clip_c=dual_clip_c)
    return PolicyLossOutput(loss=loss, ratio=ratio.detach(), clipped=clipped, centre=centre)


def mix_ppg_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, pik_logprobs: torch.Tensor,
                 advantages: torch.Tensor, *, eps_low: float, eps_high: float, dual_clip_c: float = 0.0
                 ) -> PolicyLossOutput:
    """Mix-PPG: ratio against the behaviour policy, window centred on pi_k / behaviour."""
    ratio = _ratio(logprobs, behaviour_logprobs)
    centre = _ratio(pik_logprobs, behaviour_logprobs).detach()
    loss, clipped = clipped_surrogate(ratio, centre, advantages, eps_low=eps_low, eps_high=eps_high,
                                      dual_clip_c=dual_clip_c)
    return PolicyLossOutput(loss=loss, ratio=ratio.detach(), clipped=clipped, centre=centre)


POLICY_LOSSES.register("ppo", ppo_loss)
POLICY_LOSSES.register("mix_ppg", mix_ppg_loss)
