"""PPO and Mix-PPG surrogates: hand-computed cases, invariants, gradients vs a direct formula."""

import math

import pytest
import torch

from remix_megatron.algorithms.policy_loss import POLICY_LOSSES, mix_ppg_loss, ppo_loss

pytestmark = pytest.mark.unit
EPS = dict(eps_low=0.2, eps_high=0.2)


def logs(*values):
    return torch.tensor([list(map(math.log, values))], dtype=torch.float64)


def test_ppo_hand_computed():
    # ratios 1.5, 1.5, 0.5, 0.5 against behaviour; advantages +1, -1, -1, +1
    out = ppo_loss(logs(1.5, 1.5, 0.5, 0.5), logs(1, 1, 1, 1), logs(1, 1, 1, 1),
                   torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64), **EPS)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.2, 1.5, 0.8, -0.5]], dtype=torch.float64))
    assert out.clipped.tolist() == [[True, False, True, False]]
    torch.testing.assert_close(out.ratio, torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64))


def test_mix_ppg_hand_computed_window_centred_on_pik_over_behaviour():
    # behaviour prob 0.2; pi_k 0.4 -> w = 2; pi = 0.5 -> r = 2.5; pi = 0.38 -> r = 1.9
    behaviour, pik = logs(0.2, 0.2, 0.2), logs(0.4, 0.4, 0.4)
    current = logs(0.5, 0.38, 0.5)
    adv = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    mix = mix_ppg_loss(current, behaviour, pik, adv, **EPS)
    # window [1.8, 2.2]: 2.5 -> 2.2 (clipped); 1.9 inside; A<0 with r=2.5: min(-2.5, -2.2) = -2.5
    torch.testing.assert_close(mix.loss, torch.tensor([[-2.2, -1.9, 2.5]], dtype=torch.float64))
    assert mix.clipped.tolist() == [[True, False, False]]
    torch.testing.assert_close(mix.centre, torch.full((1, 3), 2.0, dtype=torch.float64))
    # plain PPO clips the same ratios to [0.8, 1.2]
    ppo = ppo_loss(current, behaviour, pik, adv, **EPS)
    torch.testing.assert_close(ppo.loss, torch.tensor([[-1.2, -1.2, 2.5]], dtype=torch.float64))


def test_asymmetric_clip_higher():
    out = ppo_loss(logs(1.3, 0.7), logs(1, 1), logs(1, 1), torch.tensor([[1.0, -1.0]], dtype=torch.float64),
                   eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.28, 0.8]], dtype=torch.float64))


def test_dual_clip_bounds_negative_advantages():
    adv = torch.tensor([[-1.0]], dtype=torch.float64)
    ppo = ppo_loss(logs(5.0), logs(1.0), logs(1.0), adv, **EPS, dual_clip_c=3.0)
    assert ppo.loss.item() == pytest.approx(3.0) and ppo.clipped.item()
    # Mix-PPG with w = 2: bound c*w*A = -6 is below -5, so the plain surrogate stands
    mix = mix_ppg_loss(logs(1.0), logs(0.2), logs(0.4), adv, **EPS, dual_clip_c=3.0)
    assert mix.loss.item() == pytest.approx(5.0) and not mix.clipped.item()
    # and the bound does not touch positive advantages
    pos = ppo_loss(logs(5.0), logs(1.0), logs(1.0), -adv, **EPS, dual_clip_c=3.0)
    assert pos.loss.item() == pytest.approx(-1.2)


def random_case(seed, fresh=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 9)
    behaviour = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    pik = behaviour if fresh else behaviour + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    current = pik + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    return current.requires_grad_(), behaviour, pik, adv


def test_mix_ppg_equals_ppo_when_every_sample_is_fresh():
    current, behaviour, pik, adv = random_case(0, fresh=True)
    mix, ppo = mix_ppg_loss(current, behaviour, pik, adv, **EPS), ppo_loss(current, behaviour, pik, adv, **EPS)
    torch.testing.assert_close(mix.loss, ppo.loss, rtol=0, atol=0)
    g_mix, = torch.autograd.grad(mix.loss.sum(), current)
    g_ppo, = torch.autograd.grad(ppo.loss.sum(), current)
    torch.testing.assert_close(g_mix, g_ppo, rtol=0, atol=0)


def test_mix_ppg_is_w_times_ppo_on_pi_over_pik_with_scaled_eps():
    """REMIX.md's equivalent view: w * PPO(rho = pi/pi_k, half-width eps/w)."""
    current, behaviour, pik, adv = random_case(1)
    mix = mix_ppg_loss(current, behaviour, pik, adv, **EPS)
    w = torch.exp(pik - behaviour)
    rho = torch.exp(current - pik)
    eps = 0.2 / w
    expected = -w * torch.minimum(rho * adv, torch.maximum(torch.minimum(rho, 1 + eps), 1 - eps) * adv)
    torch.testing.assert_close(mix.loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ppo", "mix_ppg"])
def test_gradients_match_direct_reimplementation(name):
    current, behaviour, pik, adv = random_case(2)
    out = POLICY_LOSSES.get(name)(current, behaviour, pik, adv, **EPS, dual_clip_c=2.5)
    grad, = torch.autograd.grad(out.loss.sum(), current)
    # direct: the gradient of -r*A where the unclipped branch is active (and not dual-clipped), else 0
    r = torch.exp(current.detach() - behaviour)
    w = torch.exp(pik - behaviour) if name == "mix_ppg" else torch.ones_like(r)
    lo, hi = w - 0.2, w + 0.2
    active = torch.where(adv >= 0, r <= hi, r >= lo)
    unclipped_surrogate = torch.minimum(r * adv, r.clamp(lo, hi) * adv)
    dual = (adv < 0) & (unclipped_surrogate < 2.5 * w * adv)
    expected = torch.where(active & ~dual, -r * adv, torch.zeros_like(r))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_registry_names():
    assert POLICY_LOSSES.names() == ["mix_ppg", "ppo"]
    with pytest.raises(ValueError, match="unknown policy loss 'grpo'.*Known: mix_ppg, ppo"):
        POLICY_LOSSES.get("grpo")
