"""The four policies of a ReMix run on this rank: the trained actor (and critic), and the frozen
reference and precedent copies of the actor.

The precedent policy pi_{k-1} for KL-convex is a model copy: at iteration k it still holds
pi_{k-1}; once its log-probs are computed it takes pi_k's weights (``copy_weights``) for k+1.
At policy reincarnation the reference takes pi_T's weights the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remix_megatron.config import ExperimentConfig
from remix_megatron.console import say
from remix_megatron.convert.export import load_hf_into
from remix_megatron.models import TrainableModel, build_actor, build_critic, make_trainable
from remix_megatron.parallel import ParallelState


@dataclass
class Models:
    actor: TrainableModel
    critic: TrainableModel | None  # for estimators that need values
    ref: list  # chunks of the reference policy
    prev: list  # chunks of the precedent policy pi_{k-1}

    def named(self) -> dict:
        """What a checkpoint holds, by name."""
        named = {"actor": self.actor, "ref": self.ref, "prev": self.prev}
        if self.critic is not None:
            named["critic"] = self.critic
        return named


def copy_weights(source_chunks, target_chunks) -> None:
    """Same layout, same rank: a local copy of every parameter."""
    with torch.no_grad():
        for source, target in zip(source_chunks, target_chunks):
            for (_, s), (_, t) in zip(source.named_parameters(), target.named_parameters()):
                t.copy_(s)


def build_models(cfg: ExperimentConfig, state: ParallelState, *, with_critic: bool) -> Models:
    """Actor (+ critic), reference and precedent at this rank's layout, loaded from ``model.hf_path``."""
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    critic = None
    if with_critic:
        critic = make_trainable(build_critic(cfg.model, state, seed=cfg.trainer.seed), cfg.critic_optimizer,
                                cfg.parallel, state)
    models = Models(actor=actor, critic=critic, ref=build_actor(cfg.model, state), prev=build_actor(cfg.model, state))
    say("start", f"loading weights from {cfg.model.hf_path}", active=state.rank == 0)
    load_hf_into(cfg.model.hf_path, cfg.model, state, actor=actor.unwrapped(),
                 critic=critic.unwrapped() if critic is not None else None)
    for model in (actor, critic):
        if model is not None:
            model.optimizer.reload_model_params()
    copy_weights(actor.unwrapped(), models.ref)
    copy_weights(actor.unwrapped(), models.prev)
    return models
