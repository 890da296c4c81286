"""Exact resume: 3 iterations + save + resume + 2 == 5 uninterrupted (bitwise on CPU), across
layouts, and a process killed while saving leaves `latest` on the previous checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.distributed.test_layout_equivalence import merged

pytestmark = pytest.mark.distributed

BASE = ["configs/tiny_cpu.yaml", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "trainer.seq_length=16", "actor_optimizer.lr=1e-3", "critic_optimizer.lr=1e-3",
        "actor_optimizer.adam_eps=1e-6", "critic_optimizer.adam_eps=1e-6", "trainer.resume=true"]
TP1 = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1"]
TP2PP2 = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]


def demo(out: Path, run: Path, steps: int, layout: list[str], nproc: int, *extra: str, init: Path | None = None):
    args = ["demo", *BASE, *layout, f"trainer.num_steps={steps}", f"trainer.run_dir={run}", *extra, "--dump", str(out)]
    if init is not None:
        args += ["--init-from", str(init)]
    return run_cli(args, nproc=nproc).stdout


def bitwise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs by {(a[key] - b[key]).abs().max():.2e}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("five")
    demo(out, out / "run", 5, TP1, 1)
    return out


def test_resume_is_bitwise_identical(uninterrupted, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    demo(first, tmp_path / "run", 3, TP1, 1)
    stdout = demo(second, tmp_path / "run", 5, TP1, 1)
    assert "resumed from" in stdout and "at iteration 3" in stdout
    bitwise(merged(second, "init"), merged(first, "final"), "parameters after resume")
    bitwise(merged(second, "final"), merged(uninterrupted, "final"), "parameters after 3 + 2 iterations")
    bitwise(merged(second, "moments"), merged(uninterrupted, "moments"), "Adam moments after 3 + 2 iterations")
    state = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000005" / "trainer_state.json").read_text())
    assert state["iteration"] == 5 and state["layout"]["world_size"] == 1


def test_resume_into_another_layout(uninterrupted, tmp_path):
    init = tmp_path / "init.safetensors"
    from safetensors.torch import save_file

    save_file(merged(uninterrupted, "init"), str(init))
    saved, resumed = tmp_path / "saved", tmp_path / "resumed"
    demo(saved, tmp_path / "run", 3, TP2PP2, 4, init=init)
    demo(resumed, tmp_path / "run", 5, TP1, 1)  # TP2 x PP2 checkpoint into one process
    bitwise(merged(resumed, "init"), merged(saved, "final"), "parameters resharded TP2xPP2 -> TP1")
    final, expected = merged(resumed, "final"), merged(uninterrupted, "final")
    worst = max((final[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-5, f"training continued after resharding drifts by {worst:.2e}"


HANG = """
import sys, time
from remix_megatron import checkpoint
original = checkpoint._publish
def hang(staging, final):
    if final.name == "iter_0000004":
        print("SAVING", flush=True)
        time.sleep(300)
    original(staging, final)
checkpoint._publish = hang
from remix_megatron.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["demo", *BASE, *TP1, "trainer.num_steps=4", "trainer.save_interval=2", f"trainer.run_dir={run}"]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29700 + os.getpid() % 200)}
    proc = subprocess.Popen([sys.executable, "-c", HANG, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "SAVING":
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            break
    else:
        raise AssertionError(proc.stderr.read()[-3000:])
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "iter_0000002"
    assert (checkpoints / "iter_0000004.tmp").is_dir() and not (checkpoints / "iter_0000004").exists()
    stdout = demo(tmp_path / "out", run, 4, TP1, 1)
    assert "at iteration 2" in stdout and (checkpoints / "latest").read_text() == "iter_0000004"
    assert not (checkpoints / "iter_0000004.tmp").exists()
