"""A real sweep of two points: one tiny ReMix-PPO run (1 iteration, one process) launched through
launch/torchrun.sh, one point already finished (hand-written metrics, skipped), both aggregated."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import NO_EVAL, REPO

pytestmark = pytest.mark.e2e


def sweep(path) -> str:
    """``remix-megatron sweep PATH`` as a user runs it: one plain process that starts each point with torchrun."""
    result = subprocess.run([sys.executable, "-m", "remix_megatron.cli", "sweep", str(path)], cwd=REPO, text=True,
                            capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return result.stdout


def test_tiny_sweep_runs_and_aggregates(tmp_path):
    from remix_megatron.data.tiny import build_tiny_model

    tiny = build_tiny_model()
    out = tmp_path / "sweep"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "config": "configs/tiny_remix_ppo.yaml", "out_dir": str(out),
        "grid": {"algorithm.off_policy_portion": [0.2, 0.4]},
        "overrides": [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl", "rollout.prompts_per_step=32",
                      *NO_EVAL, "trainer.num_steps=1", "trainer.save_interval=-1"],
        "metrics": ["reward_mean", "response_length"]}))
    finished = out / "off_policy_portion-0.4"
    finished.mkdir(parents=True)
    (finished / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "rollouts_total": 16, "reward_mean": 0.25,
                                                        "response_length": 30.0}) + "\n")
    stdout = sweep(path)
    assert "[off_policy_portion-0.4] finished earlier: skipped" in stdout
    with open(out / "summary.csv") as handle:
        rows = {row["point"]: row for row in csv.DictReader(handle)}
    ran = rows["off_policy_portion-0.2"]
    # fresh prompts of the first iteration (nothing to replay yet): floor((1 - 0.2) * 32) = 25 (fresh_multiple_of 1)
    assert ran["rollouts_total"] == "25" and ran["iterations"] == "1"
    assert 0.0 <= float(ran["reward_mean"]) <= 1.0 and float(ran["response_length"]) > 0
    assert rows["off_policy_portion-0.4"] == {"point": "off_policy_portion-0.4", "algorithm.off_policy_portion": "0.4",
                                              "iterations": "1", "rollouts_total": "16", "reward_mean": "0.25",
                                              "response_length": "30.0"}
    assert (out / "sweep.png").stat().st_size > 5000 and (out / "off_policy_portion-0.2" / "config.yaml").is_file()
    assert "| off_policy_portion-0.2 | 0.2 | 1 | 25 |" in stdout


def test_failing_point_shows_its_own_error_and_log(tmp_path):
    """A point that fails at run time (prompts that are not JSON) is reported by its worker's own error
    and the path of its log, not by torchrun's ChildFailedError report."""
    from remix_megatron.data.tiny import build_tiny_model

    tiny = build_tiny_model()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "sweep"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad", "config": "configs/tiny_remix_ppo.yaml", "out_dir": str(out),
        "grid": {"trainer.seed": [1]},
        "overrides": [f"model.hf_path={tiny}", f"data.train_path={bad}", *NO_EVAL, "trainer.num_steps=1"]}))
    result = subprocess.run([sys.executable, "-m", "remix_megatron.cli", "sweep", str(path)], cwd=REPO, text=True,
                            capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    log = out / "seed-1" / "sweep_point.log"
    assert result.stderr.strip().splitlines() == [
        f"sweep error: sweep point seed-1 failed (exit 1): config error: training data ({bad}): {bad}:1: "
        "not valid JSON "
        "(Expecting value: line 1 column 1 (char 0))", f"  its full output: {log}"]
    assert "ChildFailedError" in log.read_text()  # torchrun's report is kept in the log, not repeated as the error
