"""Engine/trainer mismatch correction in the loop: the engine's sampling log-probs are stored beside
the behaviour ones, the mismatch metrics are logged, and with the fp32 HF engine (the trainer's
numerics) the correction weights are 1 up to float error."""

from __future__ import annotations

import json

import pytest

from tests.conftest import NO_EVAL, run_cli

pytestmark = pytest.mark.e2e


def test_tis_correction_runs_and_logs_the_mismatch(tmp_path):
    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.store import open_store

    tiny, run = build_tiny_model(), tmp_path / "run"
    run_cli(["train", "configs/tiny_grpo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
             f"data.eval_path={tiny}/heldout.jsonl", "rollout.prompts_per_step=4", "trainer.num_steps=2",
             "trainer.save_interval=-1", f"trainer.run_dir={run}", "algorithm.mismatch_correction=tis",
             "algorithm.mismatch_level=sequence", *NO_EVAL])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert 0 <= record["mismatch/logprob_gap_mean"] <= record["mismatch/logprob_gap_max"] < 1e-3, record
        assert 0 <= record["mismatch/kl_engine_trainer"] < 1e-6
        assert record["actor/mismatch_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert record["actor/mismatch_weight_zero_frac"] == 0.0
    stored = open_store(run / "store").read_iteration(1)
    assert stored and all(r.engine_logprobs is not None and r.engine_logprobs.size == r.response_length
                          for r in stored)
    gap = max(float(abs(r.engine_logprobs - r.behaviour_logprobs).max()) for r in stored if r.response_length)
    assert gap == pytest.approx(records[0]["mismatch/logprob_gap_max"], rel=1e-5, abs=1e-9)
