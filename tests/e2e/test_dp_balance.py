"""The trainer at DP2 under a token budget with the rows balanced over the ranks
(trainer.balance_data_parallel, the default): the collection recompute, the forward passes and
the updates exchange rows, every rank joining each exchange (a rank that skipped one would hang
the run), and training gives the unbalanced run's result to float rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import NO_EVAL, run_cli

pytestmark = pytest.mark.e2e


def train(tiny: Path, run: Path, *extra: str) -> tuple[list[dict], dict]:
    run_cli(["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
             f"data.eval_path={tiny}/heldout.jsonl", "rollout.prompts_per_step=16", "trainer.num_steps=3",
             "trainer.save_interval=-1", f"trainer.run_dir={run}", "trainer.max_tokens_per_micro_batch=96",
             *NO_EVAL, *extra], nproc=2, timeout_s=600)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = {}
    for path in sorted((run / "hf_actor").glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return records, weights


@pytest.mark.timeout(900)
def test_balanced_dp2_training_matches_the_unbalanced_run(tmp_path):
    from remix_megatron.data.tiny import build_tiny_model

    tiny = build_tiny_model()
    balanced, balanced_weights = train(tiny, tmp_path / "on")
    unbalanced, unbalanced_weights = train(tiny, tmp_path / "off", "trainer.balance_data_parallel=false")
    assert len(balanced) == len(unbalanced) == 3
    assert balanced[-1]["replayed_groups"] > 0  # the replayed rows went through the balanced forward passes
    for a, b in zip(balanced, unbalanced):
        assert a["rollouts"] == b["rollouts"] and a["reward_mean"] == b["reward_mean"]
        for key in ("actor/pg_loss", "critic/value_loss", "actor/ratio_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert balanced_weights.keys() == unbalanced_weights.keys() and balanced_weights
    for name, tensor in balanced_weights.items():
        torch.testing.assert_close(tensor, unbalanced_weights[name], rtol=1e-4, atol=1e-5, msg=name)
