"""`remix-megatron evaluate` as a user runs it: a trained checkpoint scores exactly as its HF export
(greedy and sampled, one process vs two data-parallel ranks), sampling is reproducible under a
seed, and the tiny model goes through the held-out set and a MATH500 slice end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from tests.conftest import NO_EVAL, REPO, run_cli

pytestmark = pytest.mark.e2e
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One ReMix iteration from the tiny model: a checkpoint and the HF export of the same weights."""
    from remix_megatron.data.tiny import build_tiny_model

    tiny = build_tiny_model()
    run = tmp_path_factory.mktemp("run")
    run_cli(["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
             "rollout.prompts_per_step=16", *NO_EVAL, "trainer.num_steps=1", "trainer.save_interval=1",
             f"trainer.run_dir={run}"])
    base = load_file(str(tiny / "model.safetensors"))
    trained_weights = {k: v for f in (run / "hf_actor").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(trained_weights) == set(base)
    assert any((base[k] - trained_weights[k]).abs().max() > 0 for k in base), "the update changed nothing"
    return tiny, run


def evaluate(source: list[str], out: Path, *args: str, nproc: int = 1) -> tuple[list[dict], dict]:
    run_cli(["evaluate", *source, "--out", str(out), "--template", "{problem}", "--max-prompt-tokens", "16",
             "--max-new-tokens", "40", *args], nproc=nproc)
    return pq.read_table(out / "generations.parquet").to_pylist(), json.loads((out / "summary.json").read_text())


def test_checkpoint_equals_its_hf_export_and_sampling_is_seeded(trained, tmp_path):
    tiny, run = trained
    ckpt, hf = ["--checkpoint", str(run / "checkpoints")], ["--model", str(run / "hf_actor")]
    greedy = ["--benchmarks", f"heldout={tiny}/heldout.jsonl,math500", "--data-dir", str(DATA), "--limit", "48",
              "--overlong", "truncate"]
    rows_c, summary_c = evaluate(ckpt, tmp_path / "ckpt", *greedy)
    rows_h, summary_h = evaluate(hf, tmp_path / "hf", *greedy, nproc=2)  # two data-parallel ranks
    assert summary_h["settings"]["data_parallel"] == 2
    assert rows_c == rows_h
    assert summary_c["benchmarks"]["heldout"]["score"] == summary_h["benchmarks"]["heldout"]["score"]
    heldout = [r for r in rows_c if r["benchmark"] == "heldout"]
    assert len(heldout) == 48 and [r["problem_index"] for r in heldout] == list(range(48))
    assert summary_c["benchmarks"]["heldout"]["score"] == pytest.approx(sum(r["correct"] for r in heldout) / 48)
    assert 0.05 < summary_c["benchmarks"]["heldout"]["score"] < 0.9  # the tiny model's band, not a constant
    assert summary_c["benchmarks"]["heldout"]["format_rate"] > 0.9  # it learned <think>...</think> in SFT
    math = [r for r in rows_c if r["benchmark"] == "math500"]
    assert len(math) == 48 and math[0]["problem_id"] == "math500-0000"  # MATH500 runs end to end (scores ~0)
    assert summary_c["average"] == pytest.approx((summary_c["benchmarks"]["heldout"]["score"]
                                                  + summary_c["benchmarks"]["math500"]["score"]) / 2)

    sampled = ["--benchmarks", f"heldout={tiny}/heldout.jsonl", "--limit", "8", "--samples", "4",
               "--temperature", "1.0"]
    rows_cs, summary_cs = evaluate(ckpt, tmp_path / "ckpt_s", *sampled)
    rows_hs, _ = evaluate(hf, tmp_path / "hf_s", *sampled)
    rows_other, _ = evaluate(hf, tmp_path / "hf_s1", *sampled, "--seed", "1")
    assert len(rows_cs) == 32 and rows_cs == rows_hs  # same weights, same seed: the same samples
    assert [r["response"] for r in rows_other] != [r["response"] for r in rows_hs]
    assert summary_cs["benchmarks"]["heldout"]["metric"] == "avg@4"
    shares = [sum(r["correct"] for r in rows_cs if r["problem_index"] == i) / 4 for i in range(8)]
    assert summary_cs["benchmarks"]["heldout"]["score"] == pytest.approx(sum(shares) / 8)
