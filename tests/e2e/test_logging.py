"""TensorBoard beside metrics.jsonl on a real tiny run: the same metric names and values, and a
resumed run that continues the same event directory (read back with TensorBoard's own reader)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import NO_EVAL, run_cli

pytestmark = pytest.mark.e2e


def test_tensorboard_matches_jsonl_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from remix_megatron.data.tiny import build_tiny_model

    tiny, run = build_tiny_model(), tmp_path / "run"
    args = ["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
            "rollout.prompts_per_step=32", *NO_EVAL, "trainer.save_interval=1", "trainer.resume=true",
            "trainer.loggers=[jsonl,tensorboard]", f"trainer.run_dir={run}"]
    first = run_cli([*args, "trainer.num_steps=2"]).stdout
    assert f"tensorboard event directory: {run / 'tensorboard'}" in first
    resumed = run_cli([*args, "trainer.num_steps=3"]).stdout
    assert "[event] resumed from iteration 2" in resumed
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process, one directory
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = {r["iteration"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for key in ("reward_mean", "actor/kl_ref", "actor/lr", "critic/value_loss", "rollouts_total"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({k: float(r[key]) for k, r in records.items()}, rel=1e-6), key
    assert sorted(logged) == [1, 2, 3]
