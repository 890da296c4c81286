"""KL estimators and KL-convex: zeros, hand values, Monte-Carlo agreement with the true KL."""

import math

import pytest
import torch

from remix_megatron.algorithms.kl import KL_ESTIMATORS, kl_convex

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_zero_for_identical_policies(name):
    lp = -torch.rand(3, 5) * 4
    assert torch.count_nonzero(KL_ESTIMATORS.get(name)(lp, lp.clone())) == 0


def test_hand_values():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert KL_ESTIMATORS.get("k1")(lp, ref).item() == pytest.approx(math.log(2))
    assert KL_ESTIMATORS.get("k2")(lp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert KL_ESTIMATORS.get("k3")(lp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)


def test_k3_is_clamped():
    big = KL_ESTIMATORS.get("k3")(torch.tensor([0.0]), torch.tensor([50.0]))
    assert big.item() == 10.0


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_match_true_kl(name):
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimates = KL_ESTIMATORS.get(name)(p.log()[samples], q.log()[samples])
    stderr = estimates.std().item() / math.sqrt(samples.numel())
    assert abs(estimates.mean().item() - true_kl) < 4 * stderr


def test_kl_convex_mixes_by_lambda():
    lp, ref, prev = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5])
    k3 = KL_ESTIMATORS.get("k3")
    combined, to_ref, to_prev = kl_convex(lp, ref, prev, kl_lambda=0.7, estimator="k3")
    assert combined.item() == pytest.approx(0.7 * k3(lp, ref).item() + 0.3 * k3(lp, prev).item())
    assert to_ref.item() == pytest.approx(math.exp(-1) + 1 - 1)
    only_ref, _, _ = kl_convex(lp, ref, prev, kl_lambda=1.0)
    assert only_ref.item() == pytest.approx(k3(lp, ref).item())
    with pytest.raises(ValueError, match="kl_lambda=1.5"):
        kl_convex(lp, ref, prev, kl_lambda=1.5)
