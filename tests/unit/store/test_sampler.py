"""The mixed sampler: exact proportions and window, weighting, determinism, DP split, shortage."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from remix_megatron.store import MixedSampler, open_store
from tests.unit.store.helpers import make_records

pytestmark = pytest.mark.unit


def build_store(path, iterations=range(6), groups=20, group_size=1, shards=2, row_group_size=64):
    store = open_store(path, create=True, row_group_size=row_group_size)
    per_shard = groups // shards
    for k in iterations:
        for rank in range(shards):
            store.write_shard(k, rank, make_records(k, per_shard * group_size, group_size=group_size,
                                                    first_group=rank * per_shard))
        store.publish(k, shards)
    return store


def test_exact_proportions_and_window(tmp_path):
    store = build_store(tmp_path / "s")
    sampler = MixedSampler(groups_per_step=10, window=2, seed=1)
    for k in range(2, 6):
        batch = sampler.sample(store, k, off_policy_portion=0.4)
        assert (batch.plan.num_fresh, batch.plan.num_replayed, batch.plan.shortfall) == (6, 4, 0)
        ages = Counter(batch.ages.tolist())
        assert ages[0] == 6 and ages[1] + ages[2] == 4 and set(ages) <= {0, 1, 2}
        assert all(t.iteration == k - a for t, a in zip(batch.trajectories, batch.ages))
        assert len({(t.iteration, t.group_id) for t in batch.trajectories}) == 10  # no group twice


def test_paper_rounding_of_fresh_prompts(tmp_path):
    store = build_store(tmp_path / "s", iterations=range(3), groups=256, shards=1)
    plan = MixedSampler(groups_per_step=256, window=2, fresh_multiple_of=8).plan(store, 2, 0.4)
    assert (plan.num_fresh, plan.num_replayed) == (152, 104)
    on_policy = MixedSampler(groups_per_step=256, window=2, fresh_multiple_of=8).plan(store, 2, 0.0)
    assert (on_policy.num_fresh, on_policy.num_replayed) == (256, 0)


def test_uniform_and_age_weighted_replay(tmp_path):
    store = build_store(tmp_path / "s", iterations=range(3), groups=100, shards=1)
    counts = {"uniform": Counter(), "age": Counter()}
    for seed in range(200):
        for weighting in counts:
            sampler = MixedSampler(groups_per_step=20, window=2, weighting=weighting, age_decay=0.1, seed=seed)
            plan = sampler.plan(store, 2, off_policy_portion=0.2)
            counts[weighting].update(2 - g.iteration for g in plan.groups if g.iteration < 2)
    uniform_share = counts["uniform"][1] / sum(counts["uniform"].values())
    age_share = counts["age"][1] / sum(counts["age"].values())
    assert abs(uniform_share - 0.5) < 0.05  # both window iterations equally likely
    assert age_share > 0.85  # weight 1 vs 0.1 for age 2: expected ~0.91


def test_deterministic_given_seed_and_iteration_and_resumable(tmp_path):
    store = build_store(tmp_path / "s")
    sampler = MixedSampler(groups_per_step=10, window=2, seed=7, weighting="age")
    first = sampler.plan(store, 4, 0.4)
    assert sampler.plan(store, 4, 0.4) == first
    assert MixedSampler(groups_per_step=10, window=2, seed=8, weighting="age").plan(store, 4, 0.4) != first
    resumed = MixedSampler.from_state_dict(sampler.state_dict())
    assert resumed.plan(store, 4, 0.4) == first and resumed.plan(store, 5, 0.4) == sampler.plan(store, 5, 0.4)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_dp_split_is_disjoint_and_complete_with_whole_groups(tmp_path, dp_size):
    store = build_store(tmp_path / "s", groups=12, group_size=4)  # GRPO-like: 4 responses per prompt
    sampler = MixedSampler(groups_per_step=8, window=2, seed=3)
    whole = sampler.sample(store, 5, 0.5)
    parts = [sampler.sample(store, 5, 0.5, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    keys = lambda batch: [(t.iteration, t.prompt_id) for t in batch.trajectories]  # noqa: E731
    merged = [key for part in parts for key in keys(part)]
    assert sorted(merged) == sorted(keys(whole)) and len(set(merged)) == len(merged) == 32
    for part in parts:  # every group lies entirely on one rank
        per_group = Counter((t.iteration, t.group_id) for t in part.trajectories)
        assert set(per_group.values()) <= {4}


def test_shortage_policies(tmp_path, caplog):
    store = build_store(tmp_path / "s", iterations=range(2), groups=4)
    take_all = MixedSampler(groups_per_step=10, window=2, shortage="take_all")
    assert take_all.fresh_to_generate(store, 1, 0.4) == 6
    plan = take_all.plan(store, 1, 0.4)
    assert (plan.num_fresh, plan.num_replayed, plan.shortfall) == (4, 4, 0)  # 6 fresh planned, 4 exist
    store2 = build_store(tmp_path / "t", iterations=range(2), groups=2)
    with caplog.at_level(logging.WARNING):
        short = take_all.plan(store2, 1, 0.4)
    assert (short.num_fresh, short.num_replayed, short.shortfall) == (2, 2, 2)
    assert "replay window holds 2 groups, 4 asked" in caplog.text
    fill = MixedSampler(groups_per_step=10, window=2, shortage="fill_fresh")
    assert fill.fresh_to_generate(store2, 1, 0.4) == 8  # 6 planned + the 2 the window cannot give
    assert fill.fresh_to_generate(store2, 0, 0.4) == 10  # nothing to replay at the first iteration


def test_reads_only_the_rows_it_needs(tmp_path, monkeypatch):
    from remix_megatron.store import store as store_module

    store = build_store(tmp_path / "s", iterations=range(4), groups=400, shards=2, row_group_size=8)
    rows_read = []
    original = store_module.TrajectoryStore._decode

    def spy(self, path, schema, index, batch, data):
        rows_read.append(batch.rows)
        return original(self, path, schema, index, batch, data)

    monkeypatch.setattr(store_module.TrajectoryStore, "_decode", spy)
    batch = MixedSampler(groups_per_step=16, window=2).sample(store, 3, 0.5)
    assert len(batch.trajectories) == 16
    assert sum(rows_read) <= 16 * 8  # at most one batch per sampled row, far below the 1,600 stored


def test_invalid_settings():
    with pytest.raises(ValueError, match="unknown replay weighting 'recent'. Known: age, uniform"):
        MixedSampler(groups_per_step=4, window=2, weighting="recent")
    with pytest.raises(ValueError, match="shortage='skip'"):
        MixedSampler(groups_per_step=4, window=2, shortage="skip")
    with pytest.raises(ValueError, match="dp_rank=2 outside 0..1"):
        MixedSampler.rank_groups(None, 2, 2)


def test_from_config(tmp_path):
    from remix_megatron.config import ConfigError, load_config

    cfg = load_config(None, ["model.preset=qwen2-tiny", "store.replay_weighting=age", "store.replay_age_decay=0.25",
                             "algorithm.replay_window=3", "trainer.seed=11"])
    sampler = MixedSampler.from_config(cfg, groups_per_step=256)
    assert (sampler.window, sampler.weighting, sampler.age_decay, sampler.seed, sampler.fresh_multiple_of) == (
        3, "age", 0.25, 11, 8)
    with pytest.raises(ConfigError, match="store.keep_iterations=2 would prune iterations still in the replay window"):
        load_config(None, ["model.preset=qwen2-tiny", "store.keep_iterations=2"])
