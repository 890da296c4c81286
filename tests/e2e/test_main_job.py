"""The README's main job as a user runs it: ReMix-PPO on the tiny model rises through the Mix phase,
raises held-out accuracy by at least 25 points and leaves a complete run directory."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)  # as long as run_cli's own limit: the 120 iterations take ~4 min alone, longer when shared
def test_main_job_improves_accuracy(tmp_path):
    from remix_megatron.data.tiny import build_tiny_model, is_reference_build

    tiny = build_tiny_model()
    run = tmp_path / "run"
    out = run_cli(["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}",
                   f"data.train_path={tiny}/train.jsonl", f"data.eval_path={tiny}/heldout.jsonl",
                   f"trainer.run_dir={run}"], timeout_s=900).stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert accuracy[-1] - accuracy[0] >= 0.25, accuracy
    assert records[-1]["iteration"] == 120 and records[-1]["reincarnated"]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").read_text() == "iter_0000120"
    assert (run / "hf_actor" / "config.json").is_file() and (run / "hf_actor" / "tokenizer.json").is_file()
    assert "held-out accuracy" in out and (run / "accuracy.png").is_file()
    mix = [r["eval_accuracy"] for r in records if "eval_accuracy" in r and 1 <= r["iteration"] <= 20]  # T = 20
    rises = bool(mix) and min(mix) >= accuracy[0] - 0.05 and mix[-1] > accuracy[0]
    # The configs were tuned on the reference build of the tiny model (README). On a build whose
    # kernels differ (another CPU architecture, BLAS or torch: the build pins them on x86-64) the
    # model is another one, and on one such build (unpinned, AVX2, start 0.178) the Mix phase fell
    # (0.115, 0.096, 0.146 at T = 10 for seeds 1234, 0, 1) before reincarnation lifted it to 0.469 at
    # 120 (README, "The tiny model is a pinned build"). There the check is reported as an expected failure.
    if not rises and not is_reference_build(tiny):
        pytest.xfail(f"Mix phase on a tiny model that is not the reference build: held-out {accuracy[0]:.3f} "
                     f"-> {mix} through T = 20; see README 'The tiny model is a pinned build'")
    assert rises, (accuracy[0], mix)
