"""ReMix schedules as pure functions of the training step t (counted from 1).

- ``kl_lambda(t)`` = max(1 - decay * ceil(max(t - start, 0) / interval), floor): 1.0 up to
  t = 50, then 0.9, 0.8, ... down to 0.5 from t = 91 (paper Eq. 5, default constants).
- Policy reincarnation at T: steps 1..T are ReMix (off-policy portion p, UTD m); before step
  T + 1 the reference becomes the current policy pi_T and training turns on-policy
  (p = 0, UTD = post_reincarnation_utd). T = 0 disables reincarnation.
- Rollout cost: fresh prompts per step are ``(1 - p) * B`` rounded down to a multiple of
  ``fresh_multiple_of`` (the paper's 152 of 256 at p = 0.4); each is sampled n times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from remix_megatron.config import AlgorithmConfig


def _check_step(step: int) -> None:
    if step < 1:
        raise ValueError(f"training steps count from 1, got {step}")


def kl_lambda(step: int, cfg: AlgorithmConfig) -> float:
    """The KL-convex weight on the reference policy at step ``step``."""
    _check_step(step)
    decrements = math.ceil(max(step - cfg.kl_lambda_start, 0) / cfg.kl_lambda_interval)
    return max(1.0 - cfg.kl_lambda_decay * decrements, cfg.kl_lambda_floor)


@dataclass(frozen=True)
class Phase:
    """What the schedule prescribes for one step."""

    reincarnated: bool  # on-policy phase after reincarnation
    reset_reference: bool  # make pi_ref a copy of the current policy before this step
    off_policy_portion: float  # p for this step's batch
    utd: int  # passes over this step's batch


def phase(step: int, cfg: AlgorithmConfig) -> Phase:
    _check_step(step)
    T = cfg.reincarnation_step
    if T and step > T:
        return Phase(reincarnated=True, reset_reference=step == T + 1, off_policy_portion=0.0,
                     utd=cfg.post_reincarnation_utd)
    return Phase(reincarnated=False, reset_reference=False, off_policy_portion=cfg.off_policy_portion, utd=cfg.utd)


def learning_rate(step: int, num_steps: int, lr: float, decay: str, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of iteration ``step`` (1-based) of ``num_steps``: constant, or linear
    from ``lr`` at step 1 to ``lr * min_lr_ratio`` at the last step."""
    _check_step(step)
    if decay == "constant" or num_steps <= 1:
        return lr
    if decay != "linear":
        raise ValueError(f"lr decay {decay!r} is not constant or linear")
    progress = min(step - 1, num_steps - 1) / (num_steps - 1)
    return lr * (1.0 - (1.0 - min_lr_ratio) * progress)


def evaluation_due(step: int, num_steps: int, rollouts_before: int, rollouts_after: int, *, every_steps: int,
                   every_rollouts: int) -> bool:
    """Evaluate after iteration ``step``? At the last one, and either at the first iteration whose
    rollouts generated reach each multiple of ``every_rollouts`` (when > 0) or every ``every_steps``
    iterations; never when both are 0."""
    _check_step(step)
    if every_rollouts:
        return step == num_steps or rollouts_after // every_rollouts > rollouts_before // every_rollouts
    return bool(every_steps) and (step % every_steps == 0 or step == num_steps)


def fresh_prompts(prompts_per_step: int, off_policy_portion: float, multiple_of: int) -> int:
    """Fresh prompts of a ``prompts_per_step`` batch; the rest is replayed."""
    if off_policy_portion == 0:
        return prompts_per_step
    fresh = math.floor((1.0 - off_policy_portion) * prompts_per_step / multiple_of) * multiple_of
    if fresh <= 0:
        raise ValueError(f"off_policy_portion={off_policy_portion} leaves no fresh prompt in a batch of "
                         f"{prompts_per_step} rounded to multiples of {multiple_of}")
    return fresh


def rollout_cost(num_steps: int, cfg: AlgorithmConfig, *, prompts_per_step: int, responses_per_prompt: int) -> int:
    """Responses generated in ``num_steps`` steps (the paper's cost unit)."""
    total = 0
    for step in range(1, num_steps + 1):
        p = phase(step, cfg).off_policy_portion
        total += fresh_prompts(prompts_per_step, p, cfg.fresh_multiple_of) * responses_per_prompt
    return total
