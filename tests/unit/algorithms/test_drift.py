"""Drift diagnostics against hand computations on known distributions."""

import math

import pytest
import torch

from remix_megatron.algorithms.drift import fresh_drift, malformed, replay_drift
from remix_megatron.algorithms.metrics import finalize

pytestmark = pytest.mark.unit


def test_fresh_kl_and_tv_on_a_known_pair_of_distributions():
    # pi_k = (0.5, 0.3, 0.2), pi_{k-1} = (0.25, 0.25, 0.5) over three tokens. One fresh row holds
    # each token once, weighted by how often pi_k samples it (a 10-token row: 5, 3, 2 copies), so
    # the per-token means are the exact expectations under pi_k.
    p, q = [0.5, 0.3, 0.2], [0.25, 0.25, 0.5]
    tokens = [0] * 5 + [1] * 3 + [2] * 2
    pik = torch.tensor([[math.log(p[t]) for t in tokens]])
    prev = torch.tensor([[math.log(q[t]) for t in tokens]])
    out = finalize(fresh_drift(pik, prev, torch.ones(1, 10), torch.tensor([0])))
    assert out["drift/kl_prev_fresh"] == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
    assert out["drift/tv_prev_fresh"] == pytest.approx(0.5 * sum(abs(a - b) for a, b in zip(p, q)), rel=1e-5)


def test_fresh_drift_ignores_replayed_rows_and_padding():
    pik = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.9]]))
    prev = torch.log(torch.tensor([[0.25, 0.9], [0.1, 0.1]]))
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # row 0: one real token; row 1 is replayed
    out = finalize(fresh_drift(pik, prev, mask, torch.tensor([0, 1])))
    # one token, r = 0.25 / 0.5: k3 = (r - 1) - log r, TV = 0.5 |1 - r|
    assert out["drift/kl_prev_fresh"] == pytest.approx(-0.5 + math.log(2), rel=1e-5)
    assert out["drift/tv_prev_fresh"] == pytest.approx(0.25, rel=1e-5)
    assert finalize(fresh_drift(pik, pik.clone(), mask, torch.tensor([0, 0]))) == {
        "drift/kl_prev_fresh": 0.0, "drift/tv_prev_fresh": 0.0}


def test_replay_drift_by_age():
    # w = pi_k / b per token: age 1 row (1.1, 2.0), age 2 row (0.5, padding), fresh row (1, 1)
    w = torch.tensor([[1.1, 2.0], [0.5, 7.0], [1.0, 1.0]])
    behaviour = torch.log(torch.tensor([[0.2, 0.1], [0.4, 0.1], [0.3, 0.3]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    out = finalize(replay_drift(behaviour + w.log(), behaviour, mask, torch.tensor([1, 2, 0]), max_age=2,
                                eps_low=0.2, eps_high=0.28))
    assert out["drift/abs_w_minus_1/age1"] == pytest.approx((0.1 + 1.0) / 2, rel=1e-5)
    assert out["drift/outside_window/age1"] == pytest.approx(0.5)  # 1.1 is inside [0.8, 1.28], 2.0 outside
    assert out["drift/abs_w_minus_1/age2"] == pytest.approx(0.5, rel=1e-5)
    assert out["drift/outside_window/age2"] == pytest.approx(1.0)  # the padded 7.0 does not count
    assert set(out) == {"drift/abs_w_minus_1/age1", "drift/outside_window/age1", "drift/abs_w_minus_1/age2",
                        "drift/outside_window/age2"}


@pytest.mark.parametrize(("text", "expected"), [
    ("<think>2+3=5</think> \\boxed{5}", False),
    ("\\boxed{5}  \n", False),
    ("\\boxed{\\frac{1}{2}}", False),
    ("\\boxed{5} 7", True),  # text after the final box
    ("\\boxed{5}}", True),
    ("\\boxed{3} then \\boxed{5", True),  # the final box never closes
    ("\\boxed{\\frac{1}{2}", True),
    ("no box at all", False),
])
def test_malformed(text, expected):
    assert malformed(text) is expected


def test_drift_control_lr_trajectory_on_scripted_tv():
    from remix_megatron.algorithms.drift import adapt_lr_scale

    band = dict(low=0.005, high=0.01, factor=2.0, min_scale=0.1)
    scale, trajectory = 1.0, []
    for tv in (0.0, 0.02, 0.03, 0.007, 0.001, 0.02, 0.02, 0.02, 0.02, 0.0, 0.01, 0.005):
        scale = adapt_lr_scale(scale, tv, **band)
        trajectory.append(scale)
    # never above 1; halved above 0.01; kept inside the band (its edges included); doubled below 0.005;
    # floored at 0.1
    assert trajectory == pytest.approx([1.0, 0.5, 0.25, 0.25, 0.5, 0.25, 0.125, 0.1, 0.1, 0.2, 0.2, 0.2])
