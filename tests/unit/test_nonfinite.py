"""Non-finite gradients: the step is skipped everywhere, and K in a row stop the run clearly."""

from __future__ import annotations

import types

import pytest
import torch

from remix_megatron import updates
from remix_megatron.models.optimizer import TrainableModel

pytestmark = pytest.mark.unit


class FakeOptimizer:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1
        return True, 1.0, None

    def zero_grad(self):
        pass


def model_with_grad(value: float) -> TrainableModel:
    module = torch.nn.Linear(2, 1)
    module.weight.grad = torch.full_like(module.weight, value)
    chunk = types.SimpleNamespace(module=module, zero_grad_buffer=lambda: None)
    return TrainableModel(chunks=[chunk], optimizer=FakeOptimizer())


def test_step_skips_non_finite_gradients():
    good, bad = model_with_grad(0.5), model_with_grad(float("nan"))
    assert good.grads_finite() and good.step() == (True, 1.0) and good.optimizer.steps == 1
    applied, norm = bad.step()
    assert not applied and norm != norm and bad.optimizer.steps == 0  # nan, optimizer untouched


def test_consecutive_skips_stop_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(updates, "run_pipeline", lambda *a, **k: [])
    monkeypatch.setattr(updates, "reduce_metrics", lambda logs, state: {})
    state = types.SimpleNamespace(rank=1)
    counters: dict = {}
    good, bad = model_with_grad(1.0), model_with_grad(float("inf"))
    updates.update(bad, [[]], None, state, counters, 3, "actor")
    updates.update(good, [[]], None, state, counters, 3, "actor")  # a good step resets the count
    updates.update(bad, [[]], None, state, counters, 3, "actor")
    updates.update(bad, [[]], None, state, counters, 3, "actor")
    with pytest.raises(updates.NonFiniteLossError, match="3 actor optimizer steps in a row had NaN/inf gradients"):
        updates.update(bad, [[]], None, state, counters, 3, "actor")
    assert counters["skipped_total"] == 4


def test_after_backward_sees_each_minibatch_before_its_step(monkeypatch):
    """The hook the smoke run dumps first-step gradients with: called once per minibatch, in
    order, after its backward and before its optimizer step (also when the step is skipped)."""
    monkeypatch.setattr(updates, "run_pipeline", lambda *a, **k: [])
    monkeypatch.setattr(updates, "reduce_metrics", lambda logs, state: {})
    seen = []
    model = model_with_grad(0.5)
    hook = lambda index: seen.append((index, model.optimizer.steps, model.chunks[0].module.weight.grad[0, 0].item()))  # noqa: E731
    updates.update(model, [[], [], []], None, types.SimpleNamespace(rank=0), {}, 3, "actor", after_backward=hook)
    assert seen == [(0, 0, 0.5), (1, 1, 0.5), (2, 2, 0.5)] and model.optimizer.steps == 3
    seen.clear()
    updates.update(model_with_grad(float("nan")), [[]], None, types.SimpleNamespace(rank=1), {}, 3, "critic",
                   after_backward=lambda index: seen.append(index))
    assert seen == [0]
