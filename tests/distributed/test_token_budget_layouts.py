"""Token-budget micro-batches give the fixed-size split's behaviour recompute, forward passes and
gradients (each minibatch the same rows), at TP1, TP2, PP2 and DP2 (real models, torchrun); on a
GPU, packed (THD) micro-batches give the padded path's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed

BUDGET = 96  # seq_length 48: two full-width rows, or more narrow ones


def run_worker(tmp_path, nproc: int, overrides: list[str]) -> list[dict]:
    from remix_megatron.data.tiny import build_tiny_model

    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.distributed.token_budget_worker", str(build_tiny_model()), str(out), str(BUDGET), *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((tmp_path / f"result.rank{rank}.json").read_text()) for rank in range(nproc)]


def loss_tokens(results: list[dict], name: str) -> tuple[list[int], list[int]]:
    """Loss tokens of each minibatch, fixed split and budgeted, summed over the ranks."""
    fixed, budget = zip(*(r[f"{name}_tokens"] for r in results))
    return [sum(step) for step in zip(*fixed)], [sum(step) for step in zip(*budget)]


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tensor_parallel=2"]),
                                          (2, ["parallel.pipeline_parallel=2"]), (2, [])],
                         ids=["tp1", "tp2", "pp2", "dp2"])
def test_budgeted_micro_batches_match_the_fixed_split(tmp_path, nproc, layout):
    """With DP2 the rows move between the ranks (trainer.balance_data_parallel, on): each step's
    gradient (reduced over DP) and forward results are still the fixed split's."""
    results = run_worker(tmp_path, nproc, layout)
    for name in ("actor", "critic"):
        fixed_tokens, budget_tokens = loss_tokens(results, name)
        assert fixed_tokens == budget_tokens  # each optimizer step trains the same loss tokens
    for result in results:
        assert result["recompute_gap"] < 1e-5, result
        assert result["forward_gap"] < 1e-5, result
        for name in ("actor", "critic"):
            assert len(result[f"{name}_gaps"]) == 2 * result["steps"]  # every minibatch of both UTD passes
            assert max(result[f"{name}_gaps"]) < 1e-5, (name, result[f"{name}_gaps"])
            shapes = [tuple(shape) for part in result[f"{name}_shapes"] for shape in part]
            assert all(rows * width <= BUDGET for rows, width in shapes)
            assert len(set(shapes)) > 2  # the budget made micro-batches of varying rows and widths
    # the ranks of a pipeline, and the DP ranks (different rows), run the same micro-batch counts
    for name in ("actor", "critic"):
        assert len({tuple(r[f"{name}_counts"]) for r in results}) == 1, [r[f"{name}_counts"] for r in results]
    if layout == []:  # DP2: the ranks' batches differ (37 rows against 30), so the counts had to be agreed
        assert nproc == 1 or results[0]["actor_shapes"] != results[1]["actor_shapes"]


def imbalance(results: list[dict], name: str) -> float:
    """The worst minibatch's busiest rank over the ranks' mean (positions computed)."""
    per_step = zip(*(r[f"{name}_padded"] for r in results))
    return max(max(step) / (sum(step) / len(step)) for step in per_step)


def test_balancing_evens_the_ranks_of_a_skewed_batch(tmp_path):
    """DP rank 0 holds short responses, rank 1 long ones: without balancing rank 1 computes about
    twice rank 0's positions in every minibatch; with it the ranks end within a row of each other."""
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir()
    balanced = run_worker(tmp_path / "on", 2, ["skew=1"])
    unbalanced = run_worker(tmp_path / "off", 2, ["skew=1", "trainer.balance_data_parallel=false"])
    for name in ("actor", "critic"):
        assert loss_tokens(balanced, name) == loss_tokens(unbalanced, name)
        assert imbalance(unbalanced, name) > 1.4, imbalance(unbalanced, name)
        assert imbalance(balanced, name) < 1.25, imbalance(balanced, name)
    # the same rows give the fixed split's gradients and forward results either way
    for result in balanced + unbalanced:
        assert max(result["actor_gaps"] + result["critic_gaps"]) < 1e-5
        assert result["recompute_gap"] < 1e-5 and result["forward_gap"] < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("nproc,layout", [(1, []),
                                          (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
                                          (2, ["parallel.pipeline_parallel=2"])], ids=["tp1", "tp2sp", "pp2"])
def test_packed_sequences_match_the_padded_path_on_gpu(tmp_path, nproc, layout):
    """THD micro-batches through TransformerEngine against the fixed padded split, in bf16: the
    same log-probs and values to bf16 precision, the same gradients to 2% of their largest entry."""
    results = run_worker(tmp_path, nproc, [*layout, "trainer.packed_sequences=true",
                                           f"trainer.max_tokens_per_micro_batch={BUDGET}"])
    for result in results:
        assert result["recompute_gap"] < 0.05 and result["forward_gap"] < 0.05, result
        for name in ("actor", "critic"):
            assert max(result[f"{name}_gaps"]) < 2e-2, (name, result[f"{name}_gaps"])
            fixed_tokens, packed_tokens = result[f"{name}_tokens"]
            assert fixed_tokens == packed_tokens
            assert all(rows == 1 and width <= BUDGET for part in result[f"{name}_shapes"] for rows, width in part)
