"""Schedules (lambda(t), reincarnation, cost) and the composed actor/critic losses."""

import pytest
import torch

from remix_megatron.algorithms import (
    ActorLossInputs,
    actor_loss,
    critic_loss,
    fresh_prompts,
    kl_lambda,
    phase,
    rollout_cost,
)
from remix_megatron.config import AlgorithmConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("step", "expected"), [
    (1, 1.0), (50, 1.0), (51, 0.9), (60, 0.9), (61, 0.8), (80, 0.7), (90, 0.6), (91, 0.5), (500, 0.5)])
def test_kl_lambda_table(step, expected):
    assert kl_lambda(step, AlgorithmConfig()) == pytest.approx(expected)


def test_kl_lambda_constants_are_configurable_and_steps_start_at_one():
    cfg = AlgorithmConfig(kl_lambda_start=0, kl_lambda_interval=5, kl_lambda_decay=0.25, kl_lambda_floor=0.0)
    assert [kl_lambda(t, cfg) for t in (1, 5, 6, 16, 100)] == [0.75, 0.75, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="count from 1"):
        kl_lambda(0, cfg)


def test_reincarnation_phase_switch():
    cfg = AlgorithmConfig(reincarnation_step=50, off_policy_portion=0.4, utd=2, post_reincarnation_utd=1)
    assert phase(50, cfg) == schedules_phase(False, False, 0.4, 2)
    assert phase(51, cfg) == schedules_phase(True, True, 0.0, 1)
    assert phase(52, cfg) == schedules_phase(True, False, 0.0, 1)
    never = AlgorithmConfig(reincarnation_step=0)
    assert not phase(10_000, never).reincarnated and phase(10_000, never).off_policy_portion == 0.4


def schedules_phase(reincarnated, reset, p, utd):
    from remix_megatron.algorithms.schedules import Phase

    return Phase(reincarnated=reincarnated, reset_reference=reset, off_policy_portion=p, utd=utd)


def test_rollout_cost_reproduces_the_paper():
    assert fresh_prompts(256, 0.4, 8) == 152
    assert fresh_prompts(256, 0.0, 8) == 256
    cfg = AlgorithmConfig(reincarnation_step=100)
    # 100 * 152 + 250 * 256 = 79,200 (ReMix-PPO 1.5B, 350 steps)
    assert rollout_cost(350, cfg, prompts_per_step=256, responses_per_prompt=1) == 79_200
    # GRPO samples n = 8 responses per prompt
    assert rollout_cost(60, AlgorithmConfig(reincarnation_step=50), prompts_per_step=256,
                        responses_per_prompt=8) == 8 * (50 * 152 + 10 * 256)
    with pytest.raises(ValueError, match="leaves no fresh prompt"):
        fresh_prompts(8, 0.5, 8)


def make_inputs(seed=0, batch=3, seq=6):
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    mask = (torch.rand(batch, seq, generator=gen) > 0.3).to(d)
    behaviour = -torch.rand(batch, seq, generator=gen, dtype=d) * 2
    pik = behaviour + 0.3 * torch.randn(batch, seq, generator=gen, dtype=d)
    inputs = ActorLossInputs(loss_mask=mask, advantages=torch.randn(batch, seq, generator=gen, dtype=d),
                             behaviour_logprobs=behaviour, pik_logprobs=pik,
                             ref_logprobs=pik + 0.1 * torch.randn(batch, seq, generator=gen, dtype=d),
                             prev_logprobs=pik + 0.05 * torch.randn(batch, seq, generator=gen, dtype=d),
                             sample_age=torch.tensor([0, 1, 2])[:batch])
    current = (pik + 0.2 * torch.randn(batch, seq, generator=gen, dtype=d)).requires_grad_()
    entropy = (torch.rand(batch, seq, generator=gen, dtype=d) * 3).requires_grad_()
    return current, entropy, inputs


def direct_actor_loss(current, entropy, x, lam, eps=0.2, c_ent=0.001, beta=0.001):
    """ReMix loss written straight from REMIX.md: token-mean of L_pg - c*H + beta*KLC (k3)."""
    r = torch.exp(current - x.behaviour_logprobs)
    w = torch.exp(x.pik_logprobs - x.behaviour_logprobs)
    pg = -torch.min(r * x.advantages, torch.max(torch.min(r, w + eps), w - eps) * x.advantages)
    k3 = lambda other: torch.exp(other - current) - (other - current) - 1  # noqa: E731
    per_token = pg - c_ent * entropy + beta * (lam * k3(x.ref_logprobs) + (1 - lam) * k3(x.prev_logprobs))
    return (per_token * x.loss_mask).sum() / x.loss_mask.sum()


def test_actor_loss_value_and_gradients_match_direct_formula():
    current, entropy, inputs = make_inputs()
    result = actor_loss(current, entropy, inputs, AlgorithmConfig(), kl_lambda=0.7)
    loss = result.numerator / result.denominator
    expected = direct_actor_loss(current, entropy, inputs, 0.7)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    grads = torch.autograd.grad(loss, (current, entropy))
    ref_grads = torch.autograd.grad(expected, (current, entropy))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert result.denominator.item() == int(inputs.loss_mask.sum().item())


def test_kl_convex_off_and_kl_coef_zero():
    current, entropy, inputs = make_inputs(1)
    off = actor_loss(current, entropy, inputs, AlgorithmConfig(kl_convex=False), kl_lambda=0.5)
    at_one = actor_loss(current, entropy, inputs, AlgorithmConfig(), kl_lambda=1.0)
    assert off.numerator.item() == pytest.approx(at_one.numerator.item(), rel=1e-12)
    no_kl = actor_loss(current, entropy, inputs, AlgorithmConfig(kl_coef=0.0), kl_lambda=0.5)
    expected = direct_actor_loss(current, entropy, inputs, 0.5, beta=0.0)
    assert (no_kl.numerator / no_kl.denominator).item() == pytest.approx(expected.item(), rel=1e-12)
    # passes not run (their weight is 0): the same loss, and no metric for them
    from dataclasses import replace

    skipped = actor_loss(current, entropy, replace(inputs, ref_logprobs=None, prev_logprobs=None),
                         AlgorithmConfig(kl_coef=0.0), kl_lambda=0.5)
    assert torch.equal(skipped.numerator, no_kl.numerator)
    assert {"kl_ref", "kl_prev"} <= set(no_kl.metrics) and not {"kl_ref", "kl_prev"} & set(skipped.metrics)
    no_prev = actor_loss(current, entropy, replace(inputs, prev_logprobs=None), AlgorithmConfig(kl_convex=False),
                         kl_lambda=0.5)
    assert torch.equal(no_prev.numerator, off.numerator) and "kl_prev" not in no_prev.metrics


def test_actor_metrics_hand_computed():
    d = torch.float64
    zeros = torch.zeros(2, 2, dtype=d)
    inputs = ActorLossInputs(loss_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=d),
                             advantages=torch.tensor([[1.0, -1.0], [1.0, 5.0]], dtype=d),
                             behaviour_logprobs=zeros, pik_logprobs=zeros, ref_logprobs=zeros, prev_logprobs=zeros,
                             sample_age=torch.tensor([0, 2]))
    current = torch.log(torch.tensor([[1.5, 1.0], [2.0, 9.0]], dtype=d))  # ratios 1.5, 1, 2 (and a masked 9)
    metrics = actor_loss(current, torch.zeros(2, 2, dtype=d), inputs, AlgorithmConfig(), kl_lambda=1.0).metrics
    from remix_megatron.algorithms.metrics import finalize
    out = finalize(metrics)
    assert out["clip_frac"] == pytest.approx(2 / 3)  # 1.5 and 2 with A > 0 exceed 1.2
    assert out["ratio_mean"] == pytest.approx(4.5 / 3) and out["ratio_max"] == pytest.approx(2.0)
    assert out["ratio_mean/age0"] == pytest.approx(1.25) and out["ratio_mean/age2"] == pytest.approx(2.0)
    assert "ratio_mean/age1" not in out  # no age-1 samples in this micro-batch
    assert out["advantage_min"] == -1.0 and out["advantage_max"] == 1.0
    assert out["response_length_mean"] == pytest.approx(1.5) and out["kl_lambda"] == 1.0


def test_critic_loss_composition():
    values = torch.tensor([[1.0, 0.1, 5.0]], requires_grad=True)
    result = critic_loss(values, torch.zeros(1, 3), torch.tensor([[0.2, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]]),
                         AlgorithmConfig(value_clip=0.5))
    assert (result.numerator / result.denominator).item() == pytest.approx((0.32 + 0.005) / 2)


def test_learning_rate_schedules():
    from remix_megatron.algorithms import learning_rate

    assert [learning_rate(k, 5, 1e-3, "constant") for k in (1, 3, 5)] == [1e-3] * 3
    # linear over 5 iterations to 0: 1, 0.75, 0.5, 0.25, 0 (x lr)
    assert [learning_rate(k, 5, 1.0, "linear") for k in range(1, 6)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    # to 20%: 1 - 0.8 * (k-1)/4
    assert [learning_rate(k, 5, 2.0, "linear", 0.2) for k in (1, 5)] == pytest.approx([2.0, 0.4])
    assert learning_rate(9, 5, 1.0, "linear") == 0.0  # past the end: stays at the floor
    assert learning_rate(1, 1, 3.0, "linear") == 3.0
    with pytest.raises(ValueError):
        learning_rate(1, 5, 1.0, "cosine")


def test_evaluation_due_at_matched_rollout_counts():
    from remix_megatron.algorithms import evaluation_due

    def due(per_step, num_steps, **every):
        return [k for k in range(1, num_steps + 1)
                if evaluation_due(k, num_steps, (k - 1) * per_step, k * per_step, **every)]

    # every 480 rollouts: 48 per step -> steps 10, 20; 80 per step -> 6, 12; 100 per step -> 5 (crossing 480), 10
    assert due(48, 20, every_steps=7, every_rollouts=480) == [10, 20]
    assert due(80, 13, every_steps=0, every_rollouts=480) == [6, 12, 13]  # and after the last
    assert due(100, 10, every_steps=0, every_rollouts=480) == [5, 10]
    assert due(48, 20, every_steps=7, every_rollouts=0) == [7, 14, 20]  # by iterations
    assert due(48, 20, every_steps=0, every_rollouts=0) == []
