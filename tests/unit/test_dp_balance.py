"""Balancing token-budget work over data-parallel ranks: which rows move (``balance_plan``),
checked by hand and against invariants (every row trained once, loads even, few rows moved)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remix_megatron.algorithms import ActorLossInputs
from remix_megatron.algorithms.megatron_adapter import MicroBatch
from remix_megatron.batching import balance_plan

pytestmark = pytest.mark.unit


def loads(plan, widths):
    return [sum(widths[src][i] for src, i in rows) for rows in plan]


def test_plan_by_hand():
    # rank 0: 100 tokens, rank 1: 20; mean 60. Rank 0, largest first: giving the 40 brings it to the
    # mean (40 < 2 x (100 - 60)); the 30 would then leave it 30 below (30 < 2 x 0 fails): it stays,
    # and so do 20 and 10. The 40 goes to the least loaded rank, 1: both end at 60
    widths = [[30, 40, 20, 10], [20]]
    assert balance_plan(widths) == [[(0, 0), (0, 2), (0, 3)], [(1, 0), (0, 1)]]
    # already even: nothing moves
    assert balance_plan([[10, 20], [15, 15]]) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    # rows without tokens (padding copies) never move
    assert balance_plan([[0, 0, 50], [0]]) == [[(0, 0), (0, 1), (0, 2)], [(1, 0)]]


@pytest.mark.parametrize("seed", range(6))
def test_a_skewed_batch_evens_out_and_keeps_every_row_once(seed):
    rng = np.random.default_rng(seed)
    ranks = int(rng.integers(2, 6))
    # rank 0 holds the long tail: an exponential with a 10x larger mean, capped like seq_length
    widths = [[int(min(4096, 16 + rng.exponential(800 if r == 0 else 80))) for _ in range(int(rng.integers(20, 40)))]
              for r in range(ranks)]
    plan = balance_plan(widths)
    assert sorted(item for rows in plan for item in rows) == sorted((r, i) for r in range(ranks)
                                                                    for i in range(len(widths[r])))
    before, after = [sum(w) for w in widths], loads(plan, widths)
    mean = sum(before) / ranks
    assert max(before) / mean > 2  # the test's batch is skewed
    # every rank ends within one row of the mean (greedy: a row goes to the least loaded rank)
    widest = max(max(w) for w in widths)
    assert max(after) - min(after) <= widest
    assert max(after) / mean < max(before) / mean
    moved = sum(src != r for r, rows in enumerate(plan) for src, _ in rows)
    assert moved < sum(len(w) for w in widths) / 2  # few rows move: the ranks keep most of their own
    assert balance_plan(widths) == plan  # a pure function: every rank computes the same plan


def test_widened_pads_only_past_the_old_width():
    actor = ActorLossInputs(loss_mask=torch.ones(2, 3), advantages=torch.full((2, 3), 0.5),
                            behaviour_logprobs=-torch.ones(2, 3), pik_logprobs=None, ref_logprobs=None,
                            prev_logprobs=None, sample_age=torch.tensor([0, 1]))
    batch = MicroBatch(tokens=torch.arange(6).view(2, 3), labels=torch.arange(6).view(2, 3) + 1, actor=actor)
    wide = batch.widened(5)
    assert wide.tokens.shape == (2, 5) and wide.actor.loss_mask.shape == (2, 5)
    assert torch.equal(wide.tokens[:, :3], batch.tokens) and not wide.tokens[:, 3:].any()
    assert not wide.actor.loss_mask[:, 3:].any()  # nothing to learn on the new positions
    assert torch.equal(wide.actor.sample_age, actor.sample_age) and wide.actor.pik_logprobs is None
    assert batch.widened(3) is batch
