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
from remix_megatron.models import TrainableModel, build_actor, build_critic, load_full_state_dict, make_trainable
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

    def trained(self) -> dict[str, TrainableModel]:
        """The models with optimizers, by name: the actor and the critic (when there is one)."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}


def copy_weights(source_chunks, target_chunks) -> None:
    """Same layout, same rank: a local copy of every parameter."""
    with torch.no_grad():
        for source, target in zip(source_chunks, target_chunks):
            for (_, s), (_, t) in zip(source.named_parameters(), target.named_parameters()):
                t.copy_(s)


def build_models(cfg: ExperimentConfig, state: ParallelState, *, with_critic: bool, init_from: str | None = None
                 ) -> Models:
    """Actor (+ critic), reference and precedent at this rank's layout, loaded from ``init_from`` when
    given (full weights, see ``load_full_weights``), else from ``model.hf_path``, else left at their
    seeded random initialisation (``model.hf_path`` empty: the smoke run)."""
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    critic = None
    if with_critic:
        critic = make_trainable(build_critic(cfg.model, state, seed=cfg.trainer.seed), cfg.critic_optimizer,
                                cfg.parallel, state)
    models = Models(actor=actor, critic=critic, ref=build_actor(cfg.model, state), prev=build_actor(cfg.model, state))
    if init_from:
        say("start", f"loading weights from {init_from}", active=state.rank == 0)
        load_full_weights(init_from, models.trained(), state)
    elif cfg.model.hf_path:
        say("start", f"loading weights from {cfg.model.hf_path}", active=state.rank == 0)
        load_hf_into(cfg.model.hf_path, cfg.model, state, actor=actor.unwrapped(),
                     critic=critic.unwrapped() if critic is not None else None)
    for model in models.trained().values():  # the loaded weights into the optimizer's main params
        model.optimizer.reload_model_params()
    copy_weights(actor.unwrapped(), models.ref)
    copy_weights(actor.unwrapped(), models.prev)
    return models


def load_full_weights(path: str, models: dict[str, TrainableModel], state: ParallelState) -> None:
    """This rank's slices of full (TP1/PP1) weights saved as one safetensors file, keys ``{name}.{param}``
    for each of ``models`` by name (what ``remix-megatron smoke --dump`` writes as ``init_stage*``)."""
    from safetensors.torch import load_file

    full = load_file(path)
    for name, model in models.items():
        own = {key[len(name) + 1:]: value for key, value in full.items() if key.startswith(name + ".")}
        load_full_state_dict(model.unwrapped(), own, state)
