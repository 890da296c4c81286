"""ReMix-PPO with parallel.precision=bf16 on CPU (bf16 autocast over fp32 weights) still learns: the
README's main job through its Mix phase (T = 20) raises held-out accuracy, and the fp32 engine
agrees with the bf16 actor within the log-prob check's threshold all along."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)  # 20 iterations, 3 evaluations: 8 min at a load average of ~35
def test_bf16_mix_phase_raises_accuracy(tmp_path):
    from remix_megatron.data.tiny import build_tiny_model, is_reference_build

    tiny = build_tiny_model()
    run = tmp_path / "run"
    run_cli(["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
             f"data.eval_path={tiny}/heldout.jsonl", f"trainer.run_dir={run}", "trainer.num_steps=20",
             "trainer.save_interval=-1", "data.eval_every_rollouts=0", "data.eval_interval=10",
             "parallel.precision=bf16"], timeout_s=900)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert len(accuracy) == 3, accuracy  # iterations 0, 10, 20
    gaps = [r["engine_logprob_gap"] for r in records if "engine_logprob_gap" in r]
    # the actor computes in bf16 (an fp32 actor agrees with the fp32 engine to ~2e-7), well within the
    # check's default threshold: measured 0.0010-0.0044 per iteration over the three seeds
    assert len(gaps) == 20 and 1e-4 < min(gaps) and max(gaps) < 0.05, gaps
    # earlier Intel build, seeds 1234, 0, 1 from 0.242 at T = 20: bf16 0.482, 0.605, 0.553; fp32 0.523, 0.590, 0.590.
    # On a tiny model that is not the reference build the Mix phase may not rise (an unpinned AVX2
    # build, start 0.178: bf16 0.178, 0.141, 0.170): test_main_job's expected failure, and the
    # README's "The tiny model is a pinned build".
    if accuracy[-1] - accuracy[0] < 0.15 and not is_reference_build(tiny):
        pytest.xfail(f"Mix phase on a tiny model that is not the reference build: {accuracy}; "
                     "see README 'The tiny model is a pinned build'")
    assert accuracy[-1] - accuracy[0] >= 0.15, accuracy
