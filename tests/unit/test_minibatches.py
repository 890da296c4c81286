"""Minibatches of micro-batches: the same rows per minibatch whatever the layout, padded with
silent (fully masked) micro-batches where Megatron's interleaved schedule needs whole groups."""

from __future__ import annotations

import pytest
import torch

from remix_megatron.algorithms import ActorLossInputs, kl_lambda
from remix_megatron.algorithms.megatron_adapter import CriticTargets, MicroBatch
from remix_megatron.batching import masked, minibatches

pytestmark = pytest.mark.unit


def micro_batch(index: int) -> MicroBatch:
    shape = (2, 5)
    tokens = torch.full(shape, index)
    actor = ActorLossInputs(loss_mask=torch.ones(shape), advantages=torch.ones(shape),
                            behaviour_logprobs=-torch.ones(shape), pik_logprobs=-torch.ones(shape),
                            ref_logprobs=-torch.ones(shape), prev_logprobs=-torch.ones(shape),
                            sample_age=torch.zeros(2, dtype=torch.long))
    critic = CriticTargets(loss_mask=torch.ones(shape), old_values=torch.zeros(shape), returns=torch.ones(shape))
    return MicroBatch(tokens=tokens, labels=tokens, actor=actor, critic=critic)


@pytest.mark.parametrize("count,steps", [(6, 2), (7, 3), (5, 1), (9, 4)])
def test_groups_pad_with_silent_copies_and_keep_the_rows(count, steps):
    batches = [micro_batch(i) for i in range(count)]
    plain = minibatches(batches, steps, (0, 1, 2))
    grouped = minibatches(batches, steps, (0, 1, 2), group=2)
    assert len(plain) == len(grouped) == steps
    assert sorted(int(b.tokens[0, 0]) for part in plain for b in part) == list(range(count))
    for real, padded in zip(plain, grouped):
        assert len(padded) % 2 == 0 and padded[:len(real)] == real  # the same micro-batches, in order
        for extra in padded[len(real):]:
            assert torch.equal(extra.tokens, real[-1].tokens)
            assert extra.actor.loss_mask.sum() == 0 and extra.critic.loss_mask.sum() == 0
            assert torch.equal(extra.actor.advantages, real[-1].actor.advantages)


def test_a_silent_micro_batch_adds_nothing_to_the_actor_loss():
    """Loss numerator and token count of a masked copy are 0, and its metrics observe nothing."""
    from remix_megatron.algorithms.losses import actor_loss
    from remix_megatron.config import AlgorithmConfig

    cfg = AlgorithmConfig()
    batch = masked(micro_batch(3))
    logprobs = -torch.rand(2, 5)
    result = actor_loss(logprobs, torch.rand(2, 5), batch.actor, cfg, kl_lambda=kl_lambda(1, cfg))
    assert float(result.numerator) == 0 and float(result.denominator) == 0


def test_grpo_groups_ignore_the_padding_copies():
    """Recomputed GRPO advantages of a padded batch equal those of the real rows alone: padding
    copies of the last row do not count in its group's mean and std."""
    import numpy as np

    from remix_megatron.algorithms.advantages import grpo_advantages
    from remix_megatron.batching import TrainingBatch, pad_rows
    from remix_megatron.store import Trajectory

    def row(group: int, reward: float, length: int = 3) -> Trajectory:
        return Trajectory(iteration=4, prompt_id=f"p{group}", group_id=group, prompt_tokens=np.arange(2),
                          response_tokens=np.arange(length), reward=reward, behaviour_logprobs=np.zeros(length),
                          finish_reason="stop")

    real_rows = [row(0, 1.0), row(0, 0.0), row(1, 1.0), row(1, 0.0, length=0), row(1, 0.0)]
    padded, real = pad_rows(real_rows, 4)
    assert real == 5 and len(padded) == 8
    batch = TrainingBatch(records=padded, real=real, ages=torch.zeros(8, dtype=torch.long), rows=None, steps=1)
    scores, groups = batch.group_outcomes()
    assert scores.tolist()[:5] == [1.0, 0.0, 1.0, 0.0, 0.0]  # the empty response keeps its reward
    got = grpo_advantages(scores, groups, torch.ones(8, 1), norm_std=True, eps=0.0)[:, 0]
    # by hand: group 0 {1, 0}: mean 1/2, std sqrt(1/2); group 1 {1, 0, 0}: mean 1/3, std sqrt(1/3)
    expected = [0.5 / 0.5 ** 0.5, -0.5 / 0.5 ** 0.5, (2 / 3) / (1 / 3) ** 0.5, -(1 / 3) / (1 / 3) ** 0.5,
                -(1 / 3) / (1 / 3) ** 0.5]
    torch.testing.assert_close(got[:5], torch.tensor(expected, dtype=got.dtype))
    assert got[5:].abs().sum() == 0  # a group of one has no baseline


def test_single_on_policy_pass_only_when_nothing_else_needs_the_behaviour_pass():
    """The training forward may stand in for the behaviour pass only for a single optimizer step
    on fresh samples that no later iteration replays, without a critic or mismatch correction."""
    from remix_megatron.algorithms import phase
    from remix_megatron.batching import single_on_policy_pass
    from remix_megatron.config import load_config

    grpo = load_config("configs/tiny_grpo.yaml", ["trainer.global_batch_size=80"])  # 10 prompts x 8: one step
    assert single_on_policy_pass(phase(1, grpo.algorithm), 80, grpo)
    assert not single_on_policy_pass(phase(1, grpo.algorithm), 81, grpo)  # two minibatch steps
    for override in ("trainer.reuse_training_forward=false", "algorithm.utd=2", "algorithm.mismatch_correction=tis"):
        cfg = load_config("configs/tiny_grpo.yaml", ["trainer.global_batch_size=80", override])
        assert not single_on_policy_pass(phase(1, cfg.algorithm), 80, cfg), override
    ppo = load_config("configs/tiny_ppo.yaml", ["trainer.global_batch_size=80"])
    assert not single_on_policy_pass(phase(1, ppo.algorithm), 80, ppo)  # a critic: its values come from that pass
    remix = load_config("configs/tiny_remix_grpo.yaml", ["trainer.global_batch_size=80",
                                                         "algorithm.post_reincarnation_utd=1"])
    T = remix.algorithm.reincarnation_step
    assert not single_on_policy_pass(phase(T, remix.algorithm), 80, remix)  # Mix phase: replayed later
    assert single_on_policy_pass(phase(T + 1, remix.algorithm), 80, remix)  # on-policy for good
