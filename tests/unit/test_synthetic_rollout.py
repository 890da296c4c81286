"""The smoke run's synthetic rollout: one global batch whatever the layout, responses that fit,
groups sharing a prompt and an age, and behaviour log-probs pi_k's perturbed by age only."""

from __future__ import annotations

import types

import numpy as np
import pytest

from remix_megatron.batching import pack
from remix_megatron.config import ConfigError, load_config
from remix_megatron.rollout import synthetic
from remix_megatron.rollout.synthetic import AGE_DRIFT, GROUP_SIZE, SyntheticRollout

pytestmark = pytest.mark.unit


def config(*overrides: str):
    return load_config("configs/tiny_cpu.yaml", ["trainer.global_batch_size=12", "trainer.seq_length=16", *overrides])


def dp_state(rank: int, size: int):
    return types.SimpleNamespace(dp_rank=rank, data_parallel=size)


def test_same_batch_every_time_and_responses_fit():
    cfg = config()
    a, b = SyntheticRollout.make(cfg), SyntheticRollout.make(cfg)
    assert len(a.records) == 12 and all(x.same_as(y) for x, y in zip(a.records, b.records))
    rows = pack(a.records, cfg.trainer.seq_length)
    assert int(rows.lengths.max()) <= 16  # never cut: every response token is trained
    assert rows.mask.sum(-1).tolist() == [r.response_length for r in a.records]
    assert len({r.response_length for r in a.records}) > 1 and {r.reward for r in a.records} == {0.0, 1.0}


def test_groups_share_prompt_and_age_and_ages_span_the_window():
    cfg = config("algorithm.replay_window=2")
    rollout = SyntheticRollout.make(cfg)
    for start in range(0, 12, GROUP_SIZE):
        group = rollout.records[start:start + GROUP_SIZE]
        assert len({r.group_id for r in group}) == 1 and len(set(rollout.ages[start:start + GROUP_SIZE])) == 1
        assert all(np.array_equal(r.prompt_tokens, group[0].prompt_tokens) for r in group)
    assert sorted(set(rollout.ages.tolist())) == [0, 1, 2]


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_dp_shares_cover_the_global_batch_once(size):
    rollout = SyntheticRollout.make(config())
    shares = [list(rollout.share(dp_state(rank, size))) for rank in range(size)]
    assert sum(shares, []) == list(range(12))


def test_behaviour_is_pi_k_perturbed_by_age(monkeypatch):
    rollout = SyntheticRollout.make(config())
    pik = {id(r): -np.arange(1, r.response_length + 1, dtype=np.float32) for r in rollout.records}
    values = {id(r): np.full(r.response_length, 0.5, dtype=np.float32) for r in rollout.records}

    def recompute(records, *, actor, critic, micro_batch_size, seq_length, state):
        return [pik[id(r)] for r in records], [values[id(r)] for r in records]

    monkeypatch.setattr(synthetic, "recompute_behaviour", recompute)
    rows = range(2, 8)
    records, ages = rollout.collect(5, rows, actor=[], critic=[], micro_batch_size=1, seq_length=16, state=None)
    assert ages.tolist() == rollout.ages[2:8].tolist()
    for i, record in zip(rows, records):
        age = int(rollout.ages[i])
        expected = pik[id(rollout.records[i])] - AGE_DRIFT * age * np.abs(rollout.noise[i])
        np.testing.assert_allclose(record.behaviour_logprobs, expected, rtol=0, atol=1e-7)
        assert record.iteration == 5 - age and np.all(record.values == 0.5)
        assert (age == 0) == np.array_equal(record.behaviour_logprobs, pik[id(rollout.records[i])])


def test_seq_length_without_room_for_a_response_is_refused():
    with pytest.raises(ConfigError, match="trainer.seq_length=4 leaves no room"):
        SyntheticRollout.make(config("trainer.seq_length=4"))
