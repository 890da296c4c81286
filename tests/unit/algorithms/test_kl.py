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


def test_kl_weights():
    from remix_megatron.algorithms.kl import kl_weights

    assert kl_weights(0.1, True, 0.75) == (0.1 * 0.75, 0.1 * 0.25)
    assert kl_weights(0.1, False, 0.75) == (0.1, 0.0)  # KL-convex off: reference only
    assert kl_weights(0.1, True, 1.0) == (0.1, 0.0) and kl_weights(0.0, True, 0.5) == (0.0, 0.0)


def test_kl_convex_without_a_zero_weight_side_is_bitwise_the_same():
    """A side of weight 0 may be left out (None): the sum is bitwise what it is with it, and
    its own KL is None; leaving out a side that has weight is an error."""
    gen = torch.Generator().manual_seed(0)
    lp, ref, prev = (-torch.rand(4, 6, generator=gen) * 3 for _ in range(3))
    both, _, _ = kl_convex(lp, ref, prev, kl_lambda=1.0)
    no_prev, to_ref, to_prev = kl_convex(lp, ref, None, kl_lambda=1.0)
    assert torch.equal(both, no_prev) and to_prev is None and to_ref is not None
    both0, _, _ = kl_convex(lp, ref, prev, kl_lambda=0.0)
    no_ref, to_ref, _ = kl_convex(lp, None, prev, kl_lambda=0.0)
    assert torch.equal(both0, no_ref) and to_ref is None
    assert kl_convex(lp, None, None, kl_lambda=0.5) == (None, None, None)
    with pytest.raises(ValueError, match="KL to the precedent policy has weight > 0"):
        kl_convex(lp, ref, None, kl_lambda=0.5)
    with pytest.raises(ValueError, match="KL to the reference policy has weight > 0"):
        kl_convex(lp, None, prev, kl_lambda=0.5)
