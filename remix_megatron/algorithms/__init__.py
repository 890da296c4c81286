"""ReMix algorithms: pure tensor losses, advantages and schedules, plus the Megatron adapter.

Everything but ``megatron_adapter`` is free of torch.distributed and Megatron.
"""

from remix_megatron.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageInputs,
    AdvantageOutput,
    needs_critic,
)
from remix_megatron.algorithms.aggregation import LOSS_AGGREGATIONS
from remix_megatron.algorithms.kl import KL_ESTIMATORS, kl_convex
from remix_megatron.algorithms.losses import ActorLossInputs, LossResult, actor_loss, critic_loss
from remix_megatron.algorithms.policy_loss import POLICY_LOSSES
from remix_megatron.algorithms.schedules import (
    Phase,
    evaluation_due,
    fresh_prompts,
    kl_lambda,
    learning_rate,
    phase,
    rollout_cost,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AdvantageEstimator", "AdvantageInputs", "AdvantageOutput", "needs_critic",
    "LOSS_AGGREGATIONS", "KL_ESTIMATORS", "kl_convex",
    "ActorLossInputs", "LossResult", "actor_loss", "critic_loss", "POLICY_LOSSES", "Phase", "evaluation_due",
    "fresh_prompts",
    "kl_lambda", "learning_rate", "phase", "rollout_cost",
]
