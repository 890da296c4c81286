"""A single on-policy pass takes its behaviour log-probs from the training forward (ratio exactly
1) instead of a separate actor pass: the same update, to float error, with one pass fewer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import NO_EVAL, run_cli

pytestmark = pytest.mark.e2e


def train(tiny: Path, run: Path, *extra: str) -> tuple[dict, dict]:
    # 4 prompts x 8 responses in one optimizer step of 32 rows: GRPO as the peer libraries run it
    run_cli(["train", "configs/tiny_grpo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
             f"data.eval_path={tiny}/heldout.jsonl", "rollout.prompts_per_step=4", "trainer.global_batch_size=32",
             "trainer.num_steps=1", "trainer.save_interval=-1", f"trainer.run_dir={run}", *NO_EVAL, *extra])
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    weights = {}
    for path in sorted((run / "hf_actor").glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return record, weights


def test_training_forward_stands_in_for_the_behaviour_pass(tmp_path):
    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.store import open_store

    tiny = build_tiny_model()
    reused, reused_weights = train(tiny, tmp_path / "reused")
    separate, separate_weights = train(tiny, tmp_path / "separate", "trainer.reuse_training_forward=false")
    assert reused["behaviour_recomputed"] == 0.0 and separate["behaviour_recomputed"] == 1.0
    assert reused["actor/ratio_mean"] == reused["actor/ratio_max"] == 1.0  # exactly: its own log-probs
    assert separate["actor/ratio_max"] == pytest.approx(1.0, abs=1e-5)  # two passes agree to float error
    assert reused["reward_mean"] == separate["reward_mean"]  # the same rollouts
    # the weight-sync check still runs: the engine against the training forward, in the loss
    assert reused["engine_logprob_gap"] == pytest.approx(separate["engine_logprob_gap"], abs=1e-6)
    assert reused["engine_logprob_gap"] < 1e-4 and "actor/engine_logprob_gap" not in reused
    assert reused["actor/pg_loss"] == pytest.approx(separate["actor/pg_loss"], abs=1e-6)
    for name, tensor in separate_weights.items():
        torch.testing.assert_close(reused_weights[name], tensor, rtol=0, atol=1e-6)
    moved = max(float((separate_weights[n] - load_file(str(p))[n]).abs().max())
                for p in sorted(Path(tiny).glob("*.safetensors")) for n in load_file(str(p)) if n in separate_weights)
    assert moved > 1e-5  # the update itself is far larger than the difference
    stored = open_store(tmp_path / "reused" / "store").read_iteration(1)
    assert all((r.behaviour_logprobs == r.engine_logprobs).all() for r in stored)  # the engine's, kept as behaviour
