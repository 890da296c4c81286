"""Sweeps: grid expansion with validation before anything runs, local and Slurm (stub sbatch)
commands, and aggregation of hand-written metrics files into a table and a plot."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from remix_megatron.cli import main
from remix_megatron.config import ConfigError
from remix_megatron.sweep import LAUNCH_DIR, expand, load_sweep
from tests.conftest import NO_EVAL, REPO

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # sweep files name configs relative to the repository root


def sweep_file(tmp_path: Path, **fields) -> Path:
    data = {"name": "s", "config": "configs/tiny_remix_ppo.yaml", "out_dir": str(tmp_path / "out"),
            "grid": {"algorithm.off_policy_portion": [0.2, 0.4], "algorithm.utd": [1, 2]}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_expands_in_order_with_validated_configs(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, overrides=["trainer.num_steps=7"]))
    points = expand(spec, [*NO_EVAL])
    assert [p.name for p in points] == ["off_policy_portion-0.2_utd-1", "off_policy_portion-0.2_utd-2",
                                        "off_policy_portion-0.4_utd-1", "off_policy_portion-0.4_utd-2"]
    last = points[-1]
    assert (last.config.algorithm.off_policy_portion, last.config.algorithm.utd) == (0.4, 2)
    assert last.config.trainer.num_steps == 7 and last.config.data.eval_interval == 0
    assert last.config.trainer.run_dir == str(tmp_path / "out" / last.name) == str(last.run_dir)
    assert last.overrides[-1] == f"trainer.run_dir={tmp_path / 'out' / last.name}"


def test_bad_points_fail_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean 'algorithm.utd'"):
        expand(load_sweep(sweep_file(tmp_path, grid={"algorithm.utdd": [1, 2]})))
    with pytest.raises(ConfigError, match=r"sweep point off_policy_portion-1.5: .*must lie in \[0, 1\)"):
        expand(load_sweep(sweep_file(tmp_path, grid={"algorithm.off_policy_portion": [0.2, 1.5]})))
    with pytest.raises(ConfigError, match="unknown sweep keys"):
        load_sweep(sweep_file(tmp_path, gird={}))
    # TP2 x PP2 cannot run on the sweep's 3 local processes
    path = sweep_file(tmp_path, config="configs/tiny_remix_ppo_tp2pp2.yaml", nproc_per_node=3)
    assert main(["sweep", str(path)]) == 2
    assert "world size 3 is not divisible" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_local_dry_run_prints_torchrun_commands(tmp_path, capsys):
    from remix_megatron.data.tiny import build_tiny_model

    tiny = build_tiny_model()
    files = [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl"]
    assert main(["sweep", str(sweep_file(tmp_path, nproc_per_node=2)), "trainer.num_steps=2", *files, "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 4
    assert lines[0] == (f"[off_policy_portion-0.2_utd-1] NPROC_PER_NODE=2 bash {LAUNCH_DIR}/torchrun.sh train "
                        "configs/tiny_remix_ppo.yaml trainer.wandb_group=s "
                        "trainer.wandb_name=off_policy_portion-0.2_utd-1 "
                        f"algorithm.off_policy_portion=0.2 algorithm.utd=1 trainer.num_steps=2 {' '.join(files)} "
                        f"trainer.run_dir={tmp_path}/out/off_policy_portion-0.2_utd-1")
    assert not (tmp_path / "out").exists()


def test_slurm_submits_one_job_per_point(tmp_path, monkeypatch, capsys):
    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$SBATCH_LOG"\n'
                    'echo "Submitted batch job $((4000 + $(wc -l < "$SBATCH_LOG")))"\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(tmp_path / "sbatch.log"))
    path = sweep_file(tmp_path, config="configs/scale_32b_remix_ppo.yaml",
                      grid={"algorithm.off_policy_portion": [0.2, 0.4]})
    assert main(["sweep", str(path), "--slurm"]) == 0
    submitted = (tmp_path / "sbatch.log").read_text().splitlines()
    out = tmp_path / "out"
    assert submitted == [f"--job-name=s-off_policy_portion-{p} --nodes=2 --gpus-per-node=8 {LAUNCH_DIR}/slurm.sbatch "
                         f"configs/scale_32b_remix_ppo.yaml trainer.wandb_group=s "
                         f"trainer.wandb_name=off_policy_portion-{p} algorithm.off_policy_portion={p} "
                         f"trainer.run_dir={out}/off_policy_portion-{p}" for p in (0.2, 0.4)]
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["Submitted batch job 4001", "Submitted batch job 4002"]
    # a point that does not fit its GPUs stops the sweep before any job is submitted
    too_big = sweep_file(tmp_path, config="configs/scale_32b_remix_ppo.yaml",
                         grid={"cluster.gpu_memory_gib": [140, 80]})
    assert main(["sweep", str(too_big), "--slurm"]) == 2
    assert "gpu_memory_gib-80: the memory plan does not fit" in capsys.readouterr().err
    assert len((tmp_path / "sbatch.log").read_text().splitlines()) == 2
    assert main(["sweep", str(sweep_file(tmp_path)), "--slurm"]) == 2  # CPU config: no cluster to submit to
    assert "cluster.gpus_per_node" in capsys.readouterr().err


def test_aggregation_of_hand_written_metrics(tmp_path):
    path = sweep_file(tmp_path, grid={"algorithm.off_policy_portion": [0.2, 0.4]},
                      metrics=["eval_accuracy", "reward_mean"])
    run = tmp_path / "out" / "off_policy_portion-0.2"
    run.mkdir(parents=True)
    records = [{"iteration": 0, "rollouts_total": 0, "eval_accuracy": 0.2},
               {"iteration": 1, "rollouts_total": 24, "reward_mean": 0.1},
               {"iteration": 2, "rollouts_total": 48, "reward_mean": 0.3, "eval_accuracy": 0.45}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["sweep", str(path), "--aggregate-only"]) == 0  # the second point never ran
    with open(tmp_path / "out" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0] == {"point": "off_policy_portion-0.2", "algorithm.off_policy_portion": "0.2", "iterations": "2",
                       "rollouts_total": "48", "eval_accuracy": "0.45", "reward_mean": "0.3"}
    assert rows[1] == {"point": "off_policy_portion-0.4", "algorithm.off_policy_portion": "0.4", "iterations": "0",
                       "rollouts_total": "0", "eval_accuracy": "", "reward_mean": ""}
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| off_policy_portion-0.2 | 0.2 | 2 | 48 | 0.45 | 0.3 |" in markdown
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 5000
