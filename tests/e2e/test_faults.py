"""Aimed faults (``REMIX_FAULT``, remix_megatron/faults.py) on the tiny model: a process-group
SIGTERM after a checkpoint was saved still checkpoints, a kill -9 leaves no process behind,
and kills at every window of the iteration's bookkeeping leave a run that resumes with
exactly one metrics record per iteration."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from remix_megatron.algorithms import rollout_cost
from remix_megatron.config import load_config
from tests.conftest import NO_EVAL, REPO

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_dir():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


def train_args(tiny: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
            f"data.eval_path={tiny}/heldout.jsonl", "rollout.prompts_per_step=16", "data.eval_size=16",
            *NO_EVAL, "actor_optimizer.lr_decay=constant", f"trainer.num_steps={steps}",
            f"trainer.run_dir={run}", *extra]


def limit_file_size(max_bytes: int):
    """A preexec_fn: writes past ``max_bytes`` fail (EFBIG), as on a full disk (ENOSPC) but with no mount needed."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def launch(args: list[str], *, fault: str = "", tag: str = "", timeout_s: int = 900,
           preexec=None) -> subprocess.CompletedProcess:
    """``launch/multinode.sh`` (torchrun, one process) in its own process group, as a Slurm step starts it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable,
           "NPROC_PER_NODE": "1", "MASTER_PORT": str(port), "RDZV_ID": f"faults-{uuid.uuid4().hex[:8]}",
           "REMIX_FAULT": fault, "REMIX_TEST_TAG": tag}
    return subprocess.run(["bash", "launch/multinode.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s, start_new_session=True, preexec_fn=preexec)


def iterations(run: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def tagged_processes(tag: str) -> list[str]:
    """Live processes whose environment carries ``REMIX_TEST_TAG=tag`` (everything the run started)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"REMIX_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {command[:200]}")
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def test_group_sigterm_after_a_save_checkpoints_and_resumes(tiny_dir, tmp_path):
    """torchrun/Slurm signal the whole process group. With a checkpoint saved at iteration 1,
    SIGTERM to the group must still checkpoint iteration 2 (megatron's writer once started a
    Manager process there, which the signal killed: BrokenPipeError, no checkpoint)."""
    run = tmp_path / "run"
    args = train_args(tiny_dir, run, 50, "trainer.save_interval=1")
    stopped = launch(args, fault="checkpoint_saved@1:TERM:group")
    assert "stopped by SIGTERM after iteration 2; its checkpoint is saved" in stopped.stderr, stopped.stderr[-4000:]
    assert "BrokenPipeError" not in stopped.stderr
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "iter_0000002"
    assert not list(checkpoints.glob("*.tmp")) and iterations(run) == [1, 2]
    resumed = launch(train_args(tiny_dir, run, 3, "trainer.save_interval=1"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "[3/3]" in resumed.stdout and "[2/3]" not in resumed.stdout
    assert iterations(run) == [1, 2, 3] and (checkpoints / "latest").read_text() == "iter_0000003"


def test_kill_9_after_a_save_leaves_no_process(tiny_dir, tmp_path):
    """A worker killed after its first save must not leave a checkpoint helper or a
    resource_tracker behind (each one re-parented to init for good)."""
    tag = uuid.uuid4().hex
    killed = launch(train_args(tiny_dir, tmp_path / "run", 50, "trainer.save_interval=1"),
                    fault="checkpoint_saved@1:KILL", tag=tag)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert tagged_processes(tag) == []


@pytest.mark.timeout(1800)  # six tiny runs: ~2.5 min on an idle 2-core machine, far more on a shared one
def test_kills_at_every_window_resume_to_one_record_per_iteration(tiny_dir, tmp_path):
    """save_interval=2 over 4 iterations, with iteration 0's evaluation and every second one:
    killed after iteration 1's record (no checkpoint yet: the store holds an iteration no
    checkpoint knows), right after the checkpoint of 2, after 3's record (3 runs again), then
    finished; a rerun of the finished run does nothing."""
    run = tmp_path / "run"
    args = train_args(tiny_dir, run, 4, "trainer.save_interval=2", "data.eval_interval=2")
    for fault in ("metrics_written@1:KILL", "checkpoint_saved@2:KILL", "metrics_written@3:KILL"):
        killed = launch(args, fault=fault)
        assert killed.returncode != 0 and "SIGKILL" in killed.stderr, (fault, killed.stderr[-4000:])
    done = launch(args)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4]
    cfg = load_config("configs/tiny_remix_ppo.yaml", args[2:])
    assert [r["rollouts_total"] for r in records] == [  # the counter resumed exactly at every kill
        rollout_cost(k, cfg.algorithm, prompts_per_step=16, responses_per_prompt=1) for k in range(5)]
    accuracy = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert len(accuracy) == 3  # iterations 0, 2, 4; the summary spans the whole run, not the resumed part
    assert f"held-out accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}" in done.stdout
    from remix_megatron.store import open_store

    assert open_store(run / "store").iterations() == [1, 2, 3, 4]
    exported = (run / "hf_actor" / "config.json").stat().st_mtime_ns
    again = launch(args)
    assert again.returncode == 0 and "is finished: checkpoint of iteration 4" in again.stdout, again.stderr[-3000:]
    assert "[1/4]" not in again.stdout and (run / "hf_actor" / "config.json").stat().st_mtime_ns == exported
    assert iterations(run) == [0, 1, 2, 3, 4]
    refused = launch([*args, "trainer.resume=false"])
    assert refused.returncode != 0 and "config error: trainer.resume=false but" in refused.stderr
    assert "trainer.overwrite=true" in refused.stderr and "StoreError" not in refused.stderr


def test_a_failed_checkpoint_write_is_one_clear_error(tiny_dir, tmp_path):
    """A write that fails while checkpointing (full disk) names the checkpoint, the cause and what is still usable
    (was: `[enforce fail at inline_container.cc:672] unexpected pos` from deep inside torch)."""
    run = tmp_path / "run"
    failed = launch(train_args(tiny_dir, run, 2, "trainer.save_interval=1"), preexec=limit_file_size(2 << 20))
    assert failed.returncode != 0
    line = next((line for line in failed.stderr.splitlines() if "CheckpointError: " in line), "")
    assert f"cannot write the checkpoint {run / 'checkpoints' / 'iter_0000001.tmp'}" in line, failed.stderr[-4000:]
    assert "GiB free on its filesystem: a full disk" in line and "no checkpoint is complete yet" in line
    assert not (run / "checkpoints" / "latest").exists()
