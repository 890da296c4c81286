"""GAE, V-trace GAE, GRPO and whitening: hand values, invariants, a per-sequence reference."""

import math

import pytest
import torch

from remix_megatron.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    gae,
    grpo_advantages,
    vtrace_gae,
    whiten,
)
from remix_megatron.config import AlgorithmConfig

pytestmark = pytest.mark.unit
D = torch.float64


def case():
    # prompt, prompt, 3 response tokens, padding (whose value must not leak in)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=D)
    values = torch.tensor([[9.0, 9.0, 0.5, 0.6, 0.7, 99.0]], dtype=D)
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]], dtype=D)
    return rewards, values, mask


def test_gae_hand_computed_undiscounted():
    adv, ret = gae(*case(), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0, 0, 0.5, 0.4, 0.3, 0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0, 0, 1.0, 1.0, 1.0, 0]], dtype=D))


def test_gae_hand_computed_discounted():
    adv, _ = gae(*case(), gamma=0.9, lam=0.8)
    a2 = 1 - 0.7
    a1 = 0.9 * 0.7 - 0.6 + 0.72 * a2
    a0 = 0.9 * 0.6 - 0.5 + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[0, 0, a0, a1, a2, 0]], dtype=D))


def test_vtrace_hand_computed():
    rewards, values, mask = case()
    behaviour = torch.zeros(1, 6, dtype=D)
    pik = torch.tensor([[0, 0, math.log(0.5), math.log(0.25), math.log(3.0), 0]], dtype=D)  # c = .5, .25, 1 (c_bar)
    adv, target = vtrace_gae(rewards, values, mask, pik, behaviour, gamma=1.0, lam=1.0, c_bar=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0, 0, 0.2, 0.4, 0.3, 0]], dtype=D))
    torch.testing.assert_close(target, torch.tensor([[0, 0, 0.6, 0.7, 1.0, 0]], dtype=D))


def reference_vtrace(rewards, values, mask, c, gamma, lam):
    """Per sequence, over its response tokens only, written from REMIX.md section 4."""
    adv, target = torch.zeros_like(values), torch.zeros_like(values)
    for row in range(values.size(0)):
        idx = mask[row].nonzero().flatten().tolist()
        following = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[row, idx[j + 1]] if j + 1 < len(idx) else 0.0
            next_c = c[row, idx[j + 1]] if j + 1 < len(idx) else 0.0
            following = rewards[row, t] + gamma * next_v - values[row, t] + gamma * lam * next_c * following
            adv[row, t] = following
            target[row, t] = values[row, t] + c[row, t] * following
    return adv, target


def random_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    b, s = 5, 12
    starts, lengths = torch.randint(0, 4, (b,), generator=gen), torch.randint(1, 8, (b,), generator=gen)
    pos = torch.arange(s)
    mask = ((pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])).to(D)
    rewards = torch.randn(b, s, generator=gen, dtype=D) * mask
    values = torch.randn(b, s, generator=gen, dtype=D)
    behaviour = -torch.rand(b, s, generator=gen, dtype=D) * 3
    pik = behaviour + 0.7 * torch.randn(b, s, generator=gen, dtype=D)
    return rewards, values, mask, pik, behaviour


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vtrace_matches_per_sequence_reference(seed):
    rewards, values, mask, pik, behaviour = random_batch(seed)
    c = torch.exp(pik - behaviour).clamp(max=0.9)
    adv, target = vtrace_gae(rewards, values, mask, pik, behaviour, gamma=0.95, lam=0.9, c_bar=0.9)
    ref_adv, ref_target = reference_vtrace(rewards, values, mask, c, 0.95, 0.9)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(target, ref_target)


def test_vtrace_equals_gae_when_all_traces_are_one():
    rewards, values, mask, pik, behaviour = random_batch(3)
    above = behaviour + pik.abs()  # pi_k >= behaviour everywhere: truncated at c_bar = 1
    for pi_k in (behaviour, above):
        adv, target = vtrace_gae(rewards, values, mask, pi_k, behaviour, gamma=0.97, lam=0.95, c_bar=1.0)
        ref_adv, ref_ret = gae(rewards, values, mask, gamma=0.97, lam=0.95)
        torch.testing.assert_close(adv, ref_adv, rtol=0, atol=1e-12)
        torch.testing.assert_close(target, ref_ret, rtol=0, atol=1e-12)


def test_grpo_hand_computed():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([7, 7, 3, 3, 9])  # the last response is alone in its group
    mask = torch.ones(5, 2)
    adv = grpo_advantages(scores, groups, mask, norm_std=True, eps=0.0)
    half = 0.5 / math.sqrt(0.5)  # (1 - 0.5) / unbiased std of {1, 0}
    torch.testing.assert_close(adv[:, 0], torch.tensor([half, -half, 0.0, 0.0, 0.0]))
    mean_only = grpo_advantages(scores, groups, mask, norm_std=False, eps=1e-6)
    torch.testing.assert_close(mean_only[:, 1], torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))
    assert adv.dtype == torch.float32


def test_whiten():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, generator=gen, dtype=D) * 3 + 2
    mask = (torch.rand(4, 6, generator=gen) > 0.3).to(D)
    w = whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.count_nonzero(w[~mask.bool()]) == 0


def test_estimators_from_config():
    rewards, values, mask, pik, behaviour = random_batch(5)
    inputs = AdvantageInputs(rewards=rewards, mask=mask, values=values, pik_logprobs=pik, behaviour_logprobs=behaviour,
                             scores=rewards.sum(-1), group_ids=torch.arange(5) // 2)
    cfg = AlgorithmConfig(gamma=0.9, lam=0.8, vtrace_c_bar=1.0)
    out = ADVANTAGE_ESTIMATORS.get("vtrace_gae")(inputs, cfg)
    raw, targets = vtrace_gae(rewards, values, mask, pik, behaviour, gamma=0.9, lam=0.8, c_bar=1.0)
    torch.testing.assert_close(out.advantages, whiten(raw, mask))
    torch.testing.assert_close(out.returns, targets)
    plain = ADVANTAGE_ESTIMATORS.get("gae")(inputs, AlgorithmConfig(whiten_advantages=False))
    torch.testing.assert_close(plain.advantages, gae(rewards, values, mask, gamma=1.0, lam=1.0)[0])
    recomputed = AlgorithmConfig(grpo_replay_advantage="recompute")
    assert ADVANTAGE_ESTIMATORS.get("grpo")(inputs, recomputed).returns is None
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS.get("grpo")(inputs, recomputed).advantages,
                               grpo_advantages(rewards.sum(-1), torch.arange(5) // 2, mask, norm_std=True, eps=1e-6))
    with pytest.raises(ValueError, match="'gae' needs values"):
        ADVANTAGE_ESTIMATORS.get("gae")(AdvantageInputs(rewards=rewards, mask=mask), cfg)
    with pytest.raises(ValueError, match="unknown advantage estimator 'vtrace'"):
        ADVANTAGE_ESTIMATORS.get("vtrace")


def test_grpo_stored_advantages_and_the_callers_whitener():
    """``grpo_replay_advantage: stored`` broadcasts each sample's stored advantage over its tokens
    (needing it); a whitener passed in (the trainer's spans every DP rank) replaces the local one."""
    rewards, values, mask, pik, behaviour = random_batch(4)
    stored = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=mask.dtype)
    inputs = AdvantageInputs(rewards=rewards, mask=mask, scores=rewards.sum(-1), group_ids=torch.arange(5),
                             stored_advantages=stored)
    out = ADVANTAGE_ESTIMATORS.get("grpo")(inputs, AlgorithmConfig(grpo_replay_advantage="stored"))
    torch.testing.assert_close(out.advantages, stored[:, None] * mask)
    with pytest.raises(ValueError, match="'grpo' needs stored_advantages"):
        ADVANTAGE_ESTIMATORS.get("grpo")(AdvantageInputs(rewards=rewards, mask=mask, scores=rewards.sum(-1),
                                                         group_ids=torch.arange(5)),
                                         AlgorithmConfig(grpo_replay_advantage="stored"))
    calls = []
    doubled = AdvantageInputs(rewards=rewards, mask=mask, values=values,
                              whitener=lambda a, m: calls.append(1) or 2 * a)
    raw = gae(rewards, values, mask, gamma=1.0, lam=1.0)[0]
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS.get("gae")(doubled, AlgorithmConfig()).advantages, 2 * raw)
    assert calls == [1]
    ADVANTAGE_ESTIMATORS.get("gae")(doubled, AlgorithmConfig(whiten_advantages=False))
    assert calls == [1]  # not whitening: the whitener is not called
