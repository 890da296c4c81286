"""Forward passes whose loss weight is 0 are skipped (trainer.log_unused_kl=false, the default):
training is bitwise the same as with every pass run, and only the metrics of the skipped passes
are missing. At TP1 and PP2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import NO_EVAL, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_dir():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


def train(tiny: Path, run: Path, nproc: int, *extra: str) -> tuple[list[dict], dict]:
    run_cli(["train", "configs/tiny_ppo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
             f"data.eval_path={tiny}/heldout.jsonl", "rollout.prompts_per_step=16", "trainer.num_steps=2",
             "trainer.save_interval=-1", f"trainer.run_dir={run}", f"parallel.pipeline_parallel={nproc}", *NO_EVAL,
             *extra], nproc=nproc)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = {}
    for path in sorted((run / "hf_actor").glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return records, weights


@pytest.mark.parametrize("nproc,kl_coef,skipped", [(1, "0.001", ("kl_prev",)), (1, "0", ("kl_ref", "kl_prev")),
                                                   (2, "0", ("kl_ref", "kl_prev"))])
def test_skipping_zero_weight_passes_changes_nothing_but_their_metrics(tiny_dir, tmp_path, nproc, kl_coef, skipped):
    # tiny_ppo: KL-convex off, so the precedent's weight is 0; with kl_coef 0 the reference's is too
    kl = f"algorithm.kl_coef={kl_coef}"
    full, full_weights = train(tiny_dir, tmp_path / "full", nproc, kl, "trainer.log_unused_kl=true")
    lean, lean_weights = train(tiny_dir, tmp_path / "lean", nproc, kl)
    assert full_weights.keys() == lean_weights.keys() and full_weights
    for name, tensor in full_weights.items():
        assert (tensor == lean_weights[name]).all(), name  # bitwise
    for a, b in zip(full, lean):
        assert a["actor/pg_loss"] == b["actor/pg_loss"] and a["reward_mean"] == b["reward_mean"]
        for name in ("kl_ref", "kl_prev"):
            assert f"actor/{name}" in a
            assert (f"actor/{name}" in b) == (name not in skipped), name
        assert ("drift/kl_prev_fresh" in b) == ("kl_prev" not in skipped) and "drift/kl_prev_fresh" in a
    assert len(full) == len(lean) == 2
