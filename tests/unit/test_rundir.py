"""The run directory at (re)start, without models: refusals before the heavy start, the
metrics brought back to the checkpoint, files readable by the run's group."""

from __future__ import annotations

import json
import os
import stat

import pytest

from remix_megatron.config import ConfigError, build_config, save_config
from remix_megatron.fileio import atomic_write_text
from remix_megatron.rundir import check_run_dir, finished_iteration, restore_metrics

pytestmark = pytest.mark.unit


def config(run, **trainer):
    return build_config({"model": {"preset": "qwen2-tiny"}, "trainer": {"run_dir": str(run), **trainer}})


def fake_checkpoint(run, iteration, cfg):
    """What save_checkpoint leaves that the run directory checks read: ``latest`` and config.yaml."""
    directory = run / "checkpoints" / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    save_config(cfg, directory / "config.yaml")
    (run / "checkpoints" / "latest").write_text(directory.name)


def no_barrier():
    pass


def test_resume_false_over_an_earlier_run_is_refused_naming_the_fixes(tmp_path):
    run = tmp_path / "run"
    (run / "store" / "manifests").mkdir(parents=True)
    (run / "store" / "STORE.json").write_text("{}")
    (run / "store" / "manifests" / "iter_00000001.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"trainer.resume=false but .* new trainer.run_dir.*trainer.overwrite=true"):
        check_run_dir(config(run, resume=False), rank=0, barrier=no_barrier)
    assert check_run_dir(config(run), rank=0, barrier=no_barrier) is None  # resume (the default): no checkpoint


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    run = tmp_path / "run"
    cfg = config(run, resume=False, overwrite=True)
    fake_checkpoint(run, 2, cfg)
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    (run / "reward.png").write_bytes(b"png")
    (run / "notes.txt").write_text("mine")
    calls = []
    assert check_run_dir(cfg, rank=0, barrier=lambda: calls.append("barrier")) is None
    assert calls == ["barrier", "barrier"]  # every rank looked before rank 0 removed anything
    assert (run / "notes.txt").read_text() == "mine"
    assert not any((run / name).exists() for name in ("metrics.jsonl", "reward.png", "checkpoints/latest"))


def test_unwritable_run_dir_is_found_first(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"file/run is not writable .*choose another trainer.run_dir"):
        check_run_dir(config(tmp_path / "file" / "run"), rank=0, barrier=no_barrier)
    if os.geteuid() != 0:  # root writes through permission bits
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="is not writable"):
            check_run_dir(config(read_only), rank=0, barrier=no_barrier)


def test_resume_with_a_changed_algorithm_or_batch_is_refused(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 4, config(run))
    assert check_run_dir(config(run, num_steps=10), rank=0, barrier=no_barrier) == 4  # more steps: fine
    changed = build_config({"model": {"preset": "qwen2-tiny"}, "trainer": {"run_dir": str(run), "global_batch_size": 8},
                            "algorithm": {"policy_loss": "ppo"}})
    with pytest.raises(ConfigError, match=r"iteration 4 with a different setup \(algorithm.policy_loss: 'mix_ppg' -> "
                                          r"'ppo'; trainer.global_batch_size: 4 -> 8"):
        check_run_dir(changed, rank=0, barrier=no_barrier)


def test_metrics_keep_one_record_per_iteration_up_to_the_checkpoint(tmp_path):
    lines = [{"iteration": 0, "eval_accuracy": 0.25}, {"iteration": 1, "v": 1}, {"iteration": 2, "v": 2},
             {"iteration": 3, "v": 3}, {"iteration": 3, "v": 3.5}, {"iteration": 2, "v": 2.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iteration": 4, "v"')  # cut by a kill
    kept = restore_metrics(tmp_path, 2)
    assert kept == [{"iteration": 0, "eval_accuracy": 0.25}, {"iteration": 1, "v": 1}, {"iteration": 2, "v": 2.5}]
    assert [json.loads(line) for line in path.read_text().splitlines()] == kept
    assert restore_metrics(tmp_path, None) == [] and path.read_text() == ""  # from scratch: iteration 0 runs again


def test_finished_means_checkpoint_at_num_steps_and_a_later_export(tmp_path):
    run = tmp_path / "run"
    cfg = config(run, num_steps=4)
    fake_checkpoint(run, 4, cfg)
    assert not finished_iteration(cfg, 4)  # not exported yet
    (run / "hf_actor").mkdir()
    (run / "hf_actor" / "config.json").write_text("{}")
    assert finished_iteration(cfg, 4) and not finished_iteration(config(run, num_steps=6), 4)
    os.utime(run / "hf_actor" / "config.json", ns=(0, 0))  # an export older than the checkpoint (killed re-export)
    assert not finished_iteration(cfg, 4)


def test_atomic_writes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
