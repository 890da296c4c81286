"""A signal (Slurm preemption or time limit, ``kill``) stops training cleanly: the iteration
in progress finishes, every rank agrees to stop even when only one got the signal, that
iteration is checkpointed, and ``trainer.resume=true`` continues right after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NO_EVAL, REPO, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_dir():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


def logged_iterations(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()] if path.is_file() else []


def workers_once_training(launcher: subprocess.Popen, run: Path) -> list[int]:
    """Wait until the run has logged 2 iterations; the pids of the launcher's 2 worker processes."""
    deadline = time.monotonic() + 240
    while len(logged_iterations(run)) < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert launcher.poll() is None and len(logged_iterations(run)) >= 2, "training did not start in time"
    workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(workers) == 2
    return workers


def test_a_signal_to_one_rank_checkpoints_and_stops_every_rank(tiny_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny_dir}",
            f"data.train_path={tiny_dir}/train.jsonl",
            "rollout.prompts_per_step=16", *NO_EVAL, "trainer.save_interval=0", "trainer.num_steps=200",
            "trainer.resume=true", f"trainer.run_dir={run}"]  # save_interval=0: only the last (or stopping) iteration
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "remix_megatron.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        workers = workers_once_training(launcher, run)
        os.kill(workers[-1], signal.SIGUSR1)  # one rank only: the other learns it at the iteration's end
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0  # torchrun reports the workers' 128 + SIGUSR1 exits
    stopped = [int(line.split("after iteration ")[1].split(";")[0]) for line in stderr.splitlines()
               if "stopped by SIGUSR1 after iteration" in line]
    assert stopped and "resume with trainer.resume=true" in stderr, stderr[-3000:]
    last = stopped[0]
    assert 2 <= last < 200 and logged_iterations(run)[-1] == last
    assert (run / "checkpoints" / "latest").read_text() == f"iter_{last:07d}"
    assert "received SIGUSR1: finishing this iteration" in stdout + stderr
    assert not (run / "hf_actor").exists()  # the final export is for finished runs only
    out = run_cli([*args, f"trainer.num_steps={last + 1}"], nproc=2).stdout  # the requeued job
    assert f"[{last + 1}/{last + 1}]" in out and f"[{last}/" not in out
    assert logged_iterations(run)[-1] == last + 1 and (run / "hf_actor").is_dir()


def test_slurm_style_signal_to_every_process_of_the_step(tiny_dir, tmp_path):
    """Slurm's ``--signal`` (without ``B:``) reaches every process of the step: torchrun, which
    forwards it to its workers, and each worker directly. Started as the Slurm script starts it
    (``launch/multinode.sh``), torchrun must survive SIGUSR1 and every worker, hearing it twice,
    must still finish its iteration and checkpoint it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "run"
    args = ["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny_dir}",
            f"data.train_path={tiny_dir}/train.jsonl", "rollout.prompts_per_step=16", *NO_EVAL,
            "trainer.save_interval=0", "trainer.num_steps=200", "trainer.resume=true", f"trainer.run_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, "NNODES": "1",
           "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RDZV_ID": f"stop-{os.getpid()}", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    launcher = subprocess.Popen(["bash", "launch/multinode.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # multinode.sh execs torchrun: same pid
    try:
        workers = workers_once_training(launcher, run)
        for pid in [launcher.pid, *workers]:
            os.kill(pid, signal.SIGUSR1)
        stdout, stderr = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "stopped by SIGUSR1 after iteration" in stderr, stderr[-3000:]
    last = logged_iterations(run)[-1]
    assert (run / "checkpoints" / "latest").read_text() == f"iter_{last:07d}"
    # (whether a worker sees the second SIGUSR1 as a repeat or the two merge into one pending
    # signal is up to timing; tests/unit/test_stop_request.py covers the repeat)
