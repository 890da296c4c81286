"""benchmarks/sample_efficiency.py: the matched-rollout evaluation schedule and the table arithmetic,
on fake metrics files with hand-computed expectations."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sample_efficiency as se  # noqa: E402

pytestmark = pytest.mark.unit


def test_every_run_is_evaluated_at_the_same_rollout_counts():
    # 48 fresh rollouts per Mix-phase step (ReMix, the no-replay control) and 80 per on-policy step
    # (PPO, GRPO, ReMix after T = 20) all land on multiples of 240 within the 1,920 budget.
    expected = [0, 240, 480, 720, 960, 1200, 1440, 1680, 1920]
    for name in ("ppo", "remix_ppo", "no_replay_ppo", "grpo", "remix_grpo", "no_replay_grpo", "remix_ppo_utd1"):
        cfg = se.load(name)
        steps = se.steps_for_budget(cfg, 1920)
        assert se.evaluation_rollouts(cfg, steps, 240) == expected, name
    assert se.steps_for_budget(se.load("ppo"), 1920) == 24  # 24 x 80
    assert se.steps_for_budget(se.load("remix_ppo"), 1920) == 32  # 20 x 48 + 12 x 80
    assert se.steps_for_budget(se.load("no_replay_ppo"), 1920) == 40  # 40 x 48


def fake_metrics(path: Path, accuracies: dict[int, float], per_step: int = 80) -> Path:
    """A metrics.jsonl whose evaluations sit at the given rollout counts."""
    lines = [{"iteration": 0, "rollouts_total": 0, "eval_accuracy": accuracies[0]}]
    for k in range(1, max(accuracies) // per_step + 1):
        record = {"iteration": k, "rollouts_total": k * per_step, "rollouts": per_step, "reincarnated": False,
                  "drift/kl_prev_fresh": 0.01 * k}
        if k * per_step in accuracies:
            record["eval_accuracy"] = accuracies[k * per_step]
        lines.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_accuracy_curve_refuses_unmatched_evaluations(tmp_path):
    path = fake_metrics(tmp_path / "m.jsonl", {0: 0.2, 240: 0.3, 480: 0.5})
    assert se.accuracy_curve(path, [0, 240, 480]) == [(0, 0.2), (240, 0.3), (480, 0.5)]
    with pytest.raises(ValueError, match="not the matched"):
        se.accuracy_curve(path, [0, 160, 480])


def test_table_arithmetic_by_hand(tmp_path):
    # Two seeds of a baseline and of a compared run on the grid 0, 240, 480, 720 (budget 720).
    base = {"0": {0: 0.2, 240: 0.3, 480: 0.4, 720: 0.5}, "1": {0: 0.2, 240: 0.2, 480: 0.2, 720: 0.3}}
    other = {"0": {0: 0.2, 240: 0.5, 480: 0.5, 720: 0.6}, "1": {0: 0.2, 240: 0.4, 480: 0.3, 720: 0.4}}
    results = {}
    for name, seeds in (("ppo", base), ("remix_ppo", other)):
        for seed, acc in seeds.items():
            path = fake_metrics(tmp_path / f"{name}{seed}.jsonl", acc)
            results.setdefault(name, {}).setdefault("1e-4", {})[seed] = (se.accuracy_curve(path, [0, 240, 480, 720]),
                                                                         path)
    # a worse lr for the compared run, so the best lr must be picked per run
    worse = fake_metrics(tmp_path / "worse.jsonl", {0: 0.2, 240: 0.1, 480: 0.1, 720: 0.1})
    curve = se.accuracy_curve(worse, [0, 240, 480, 720])
    results["remix_ppo"]["2e-4"] = {"0": (curve, worse), "1": (curve, worse)}
    summary = se.summarize(results, [0.3, 0.45], budget=720)
    # trapezoids / span: base seed 0 (0.25 + 0.35 + 0.45) / 3 = 0.35; seed 1 (0.2 + 0.2 + 0.25) / 3
    row = summary["runs"]["ppo"]["by_lr"]["1e-4"]
    assert row["0"]["mean"] == pytest.approx(0.35) and row["1"]["mean"] == pytest.approx(0.65 / 3)
    assert row["0"]["rollouts_to"] == {"0.3": 240, "0.45": 720}
    assert row["1"]["rollouts_to"] == {"0.3": 720, "0.45": None}
    assert summary["runs"]["remix_ppo"]["best_lr"] == "1e-4"
    other_rows = summary["runs"]["remix_ppo"]["by_lr"]["1e-4"]
    assert other_rows["0"]["mean"] == pytest.approx((0.35 + 0.5 + 0.55) / 3)  # 0.4667
    assert other_rows["1"]["mean"] == pytest.approx((0.3 + 0.35 + 0.35) / 3)  # 0.3333
    pair = summary["pairs"]["remix_ppo - ppo"]
    diffs = [(1.4 - 1.05) / 3, (1.0 - 0.65) / 3]  # both +0.1167
    assert pair["mean_diff"]["per_seed"] == pytest.approx(diffs)
    assert pair["mean_diff"]["mean"] == pytest.approx(0.35 / 3)
    assert pair["mean_diff"]["std"] == pytest.approx(0, abs=1e-9)
    assert pair["final_diff"]["per_seed"] == pytest.approx([0.1, 0.1])
    # to 0.3: baseline 240 and 720 (mean 480), compared 240 and 240: 2x; to 0.45: baseline 720 and never
    # (counted as the 720 budget, so the ratio is a bound), compared 240 and never (720): 720 / 480
    assert pair["rollouts_ratio"]["0.3"] == {"ratio": pytest.approx(2.0), "bound": False}
    assert pair["rollouts_ratio"]["0.45"] == {"ratio": pytest.approx(1.5), "bound": True}
    # drift means over the iterations in the first half of the budget (rollouts <= 360: iterations 1-4)
    assert summary["runs"]["ppo"]["drift"]["drift/kl_prev_fresh"] == pytest.approx(0.025)
    table = se.markdown(summary, [0.3, 0.45], 720)
    assert "| remix_ppo - ppo | +0.117 ± 0.000 (+0.117, +0.117) | +0.100 ± 0.000 | 2.00x | ~1.50x |" in table
    assert "| ppo | 1e-4 | 0.200 | 0.283 (0.350, 0.217) | 0.400 (0.500, 0.300) | 240, 720 | 720, never |" in table
    # one seed's lr chosen on the other seed: remix_ppo's 1e-4 beats 2e-4 on either, so the same pair
    assert summary["held_out"]["lrs"]["remix_ppo"] == {"0": "1e-4", "1": "1e-4"}
    assert "| remix_ppo - ppo | +0.117 ± 0.000 (+0.117, +0.117) | 1e-4, 1e-4; 1e-4, 1e-4 |" in table


def test_held_out_selection_chooses_each_seeds_lr_on_the_other_seeds():
    by_lr = {"1e-4": {"0": {"mean": 0.5}, "1": {"mean": 0.1}, "2": {"mean": 0.4}},
             "5e-5": {"0": {"mean": 0.3}, "1": {"mean": 0.35}, "2": {"mean": 0.3}}}
    assert se.best_lr(by_lr) == "1e-4"  # 0.333 over all seeds vs 0.317
    rows, lrs = se.held_out_rows(by_lr)
    # seed 0 from seeds 1, 2: 0.25 vs 0.325; seed 1 from 0, 2: 0.45 vs 0.3; seed 2 from 0, 1: 0.3 vs 0.325
    assert lrs == {"0": "5e-5", "1": "1e-4", "2": "5e-5"}
    assert rows == {"0": {"mean": 0.3}, "1": {"mean": 0.1}, "2": {"mean": 0.3}}


def test_run_times_sum_the_timed_runs(tmp_path):
    paths = []
    for name, timing in (("a", {"wall_s": 100.0, "cpu_s": 90.0}), ("b", {"wall_s": 50.0, "cpu_s": 45.0}), ("c", None)):
        (tmp_path / name).mkdir()
        if timing:
            (tmp_path / name / "benchmark_time.json").write_text(json.dumps(timing))
        paths.append(tmp_path / name / "metrics.jsonl")
    assert se.run_times(paths) == {"runs_timed": 2, "runs": 3, "wall_s": 150.0, "cpu_s": 135.0}
    assert se.run_times(paths[2:]) is None
