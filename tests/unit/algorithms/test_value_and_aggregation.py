"""Clipped value loss, loss aggregation modes and metric merging: hand values and invariants."""

import pytest
import torch

from remix_megatron.algorithms.aggregation import aggregate
from remix_megatron.algorithms.metrics import Max, Mean, Min, finalize, merge
from remix_megatron.algorithms.value_loss import clipped_value_loss

pytestmark = pytest.mark.unit


def test_clipped_value_loss_hand_computed():
    values = torch.tensor([[1.0, 1.0, 0.1]], requires_grad=True)
    old, returns = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.2, 2.0, 0.0]])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.5)
    # 1: max(0.8^2, 0.3^2)/2 = 0.32; 2: max(1, 1.5^2)/2 = 1.125 (clipped); 3: in range: 0.1^2/2
    torch.testing.assert_close(loss, torch.tensor([[0.32, 1.125, 0.005]]))
    assert clipped.tolist() == [[False, True, False]]
    grad, = torch.autograd.grad(loss.sum(), values)
    torch.testing.assert_close(grad, torch.tensor([[0.8, 0.0, 0.1]]))  # v - R where unclipped, else 0
    unclipped, none = clipped_value_loss(values, old, returns, clip=0.0)
    torch.testing.assert_close(unclipped, 0.5 * (values - returns) ** 2)
    assert not none.any()


def test_value_inside_the_window_is_never_clipped_by_rounding():
    """A critic value moved 0.36 (inside the 0.5 window) where old + (v - old) != v in float32: the
    token is not clipped and its loss is exactly the unclipped one (the clip fraction counted
    such tokens, and flipped between TP/DP layouts on summation order)."""
    values, old, returns = torch.tensor([0.47215548157691956]), torch.tensor([0.11335860192775726]), torch.zeros(1)
    assert (old + (values - old)).item() != values.item()  # the rounding this guards against
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.5)
    assert not clipped.any() and torch.equal(loss, 0.5 * (values - returns) ** 2)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(("mode", "numerator", "denominator"), [
    ("token_mean", 10.0, 4),
    ("seq_mean_token_mean", 2.0 + 4.0, 2),
    ("seq_mean_token_sum", 10.0, 2),
    ("token_sum_norm", 10.0, 2 * 5),
])
def test_aggregation_hand_computed(mode, numerator, denominator):
    num, den = aggregate(PER_TOKEN, MASK, mode, norm_tokens=5)
    assert num.item() == pytest.approx(numerator) and den.item() == denominator and den.dtype == torch.int


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"])
def test_aggregation_splits_additively(mode):
    """Sum of the parts' numerators / sum of their denominators == the whole batch's loss."""
    gen = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 7, generator=gen)
    mask = (torch.rand(6, 7, generator=gen) > 0.4).float()
    whole = aggregate(per_token, mask, mode, norm_tokens=7)
    parts = [aggregate(per_token[i:i + 2], mask[i:i + 2], mode, norm_tokens=7) for i in (0, 2, 4)]
    assert (sum(p[0] for p in parts) / sum(p[1] for p in parts)).item() == pytest.approx(
        (whole[0] / whole[1]).item(), rel=1e-6)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        aggregate(PER_TOKEN, MASK, "mean")
    with pytest.raises(ValueError, match="norm_tokens > 0"):
        aggregate(PER_TOKEN, MASK, "token_sum_norm")


def test_metric_merge_and_finalize():
    a = {"m": Mean.of(torch.tensor([1.0, 2.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])),
         "hi": Max.of(torch.tensor([1.0, 5.0]), torch.tensor([1.0, 0.0])),
         "lo": Min.of(torch.tensor([3.0, -5.0]), torch.tensor([1.0, 0.0])),
         "empty": Mean.of(torch.tensor([1.0]), torch.tensor([0.0]))}
    b = {"m": Mean.of(torch.tensor([6.0]), torch.tensor([1.0])), "hi": Max.of(torch.tensor([2.0]), torch.tensor([1.0])),
         "lo": Min.of(torch.tensor([4.0]), torch.tensor([1.0])),
         "empty": Mean.of(torch.tensor([1.0]), torch.tensor([0.0]))}
    out = finalize(merge([a, b]))
    assert out == {"m": pytest.approx(3.0), "hi": 2.0, "lo": 3.0}
