"""Checkpoints with the distributed optimizer (parallel.use_distributed_optimizer=true): resumed at DP2
and at PP2 x DP2 bitwise as the uninterrupted run, and a DP2 checkpoint resumed into DP1 layouts (1 process, TP2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import NO_EVAL, run_cli

pytestmark = pytest.mark.distributed

CONFIG = "configs/tiny_remix_ppo.yaml"
# the resumed iterations (3, 4) are reincarnated on-policy steps; the lr stays constant because a decay
# depends on num_steps, which the interrupted run extends from 2 to 4
COMPARED = ("reward_mean", "rollouts_total", "response_length", "actor/pg_loss", "actor/kl_ref", "actor/grad_norm",
            "critic/value_loss", "critic/grad_norm")


@pytest.fixture(scope="module")
def tiny_dir():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


def train(tiny: Path, run: Path, steps: int, nproc: int, *layout: str) -> str:
    args = [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl", f"data.eval_path={tiny}/heldout.jsonl",
            *NO_EVAL, "rollout.prompts_per_step=32", "algorithm.reincarnation_step=2", "algorithm.fresh_multiple_of=8",
            "trainer.global_batch_size=32", "actor_optimizer.lr_decay=constant", "trainer.save_interval=2",
            "trainer.resume=true", f"trainer.num_steps={steps}", f"trainer.run_dir={run}",
            "parallel.use_distributed_optimizer=true", *layout]
    return run_cli(["train", CONFIG, *args], nproc=nproc).stdout


def metrics(run: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def saved_at_dp2(tiny_dir, tmp_path_factory) -> Path:
    """A DP2 run (2 processes, TP1 PP1) that checkpointed after iteration 2."""
    run = tmp_path_factory.mktemp("dp2")
    train(tiny_dir, run, 2, 2)
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000002"
    return run


@pytest.mark.parametrize("nproc,layout", [(2, ()), (4, ("parallel.pipeline_parallel=2",))], ids=["dp2", "pp2_dp2"])
def test_resume_is_bitwise_the_uninterrupted_run(tiny_dir, tmp_path, nproc, layout):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_dir, straight, 4, nproc, *layout)
    train(tiny_dir, resumed, 2, nproc, *layout)
    out = train(tiny_dir, resumed, 4, nproc, *layout)
    assert "resumed from iteration 2" in out and "[3/4]" in out and "[1/4]" not in out
    a, b = metrics(straight), metrics(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for key in COMPARED:  # iteration 4 follows the first optimizer step after the resume: Adam's moments and step
        assert [a[k][key] for k in (3, 4)] == [b[k][key] for k in (3, 4)], key  # bitwise: the same floats


def test_dp2_checkpoint_resumes_into_dp1_layouts(tiny_dir, saved_at_dp2, tmp_path):
    """The optimizer state is saved in model-parameter shapes (fully_reshardable), so other TP/DP layouts
    load it: resumed at 1 process and at TP2, both draw the same fresh rollouts (the RNG streams of another
    layout are not restored) and train on to the same numbers (1e-4), optimizer step after the resume included."""
    resumed = {}
    for name, nproc, layout in (("one", 1, ()), ("tp2", 2, ("parallel.tensor_parallel=2",))):
        shutil.copytree(saved_at_dp2, tmp_path / name)
        assert "resumed from iteration 2" in train(tiny_dir, tmp_path / name, 4, nproc, *layout)
        resumed[name] = metrics(tmp_path / name)
    one, tp2 = resumed["one"], resumed["tp2"]
    assert [one[k]["rollouts_total"] for k in (3, 4)] == [tp2[k]["rollouts_total"] for k in (3, 4)] == [64, 96]
    for key in COMPARED:
        assert [tp2[k][key] for k in (3, 4)] == pytest.approx([one[k][key] for k in (3, 4)], rel=1e-4, abs=1e-6), key


def test_resume_without_the_distributed_optimizer_is_a_clear_error(tiny_dir, saved_at_dp2, tmp_path):
    """The two optimizers' states have different formats (megatron fails with KeyError 'pre_wd_mult')."""
    shutil.copytree(saved_at_dp2, tmp_path / "run")
    with pytest.raises(AssertionError, match=r"use_distributed_optimizer=true, a format this run's optimizer cannot"):
        train(tiny_dir, tmp_path / "run", 4, 1, "parallel.use_distributed_optimizer=false")
