"""The README's main job as a user runs it: ReMix-PPO on the tiny model raises held-out accuracy
by at least 20 points and leaves a complete run directory."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_main_job_improves_accuracy(tmp_path):
    from remix_megatron.data.tiny import build_tiny_model

    tiny = build_tiny_model()
    run = tmp_path / "run"
    out = run_cli(["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}",
                   f"data.train_path={tiny}/train.jsonl", f"data.eval_path={tiny}/heldout.jsonl",
                   f"trainer.run_dir={run}"], timeout_s=900).stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert accuracy[-1] - accuracy[0] >= 0.20, accuracy
    assert records[-1]["iteration"] == 200 and records[-1]["reincarnated"]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").read_text() == "iter_0000200"
    assert (run / "hf_actor" / "config.json").is_file() and (run / "hf_actor" / "tokenizer.json").is_file()
    assert "held-out accuracy" in out and (run / "accuracy.png").is_file()
