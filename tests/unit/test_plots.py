"""Run plots: phases and the reincarnation step from the metrics, honest titles, every diagnostic
plotted when logged, and `remix-megatron plot` overlaying runs (a running one included)."""

from __future__ import annotations

import json

import pytest

from remix_megatron.cli import main
from remix_megatron.metrics_log import (
    PLOTS,
    describe,
    phases,
    plot_title,
    reincarnation_point,
    run_names,
    write_plots,
)

pytestmark = pytest.mark.unit


def history(steps: int = 6, T: int = 3, *, drift: bool = False, fresh: int = 10) -> list[dict]:
    """A ReMix run's records: iterations 1..T Mix (p = 0.4), then on-policy; ``fresh`` rollouts each."""
    records = [{"iteration": 0, "rollouts_total": 0, "eval_accuracy": 0.2}]
    for k in range(1, steps + 1):
        mix = k <= T
        record = {"iteration": k, "rollouts_total": fresh * k, "reincarnated": not mix,
                  "off_policy_portion": 0.4 if mix else 0.0, "reward_mean": 0.1 * k, "response_length": 20.0 + k,
                  "actor/ratio_mean": 1.0 + 0.01 * k, "actor/ratio_mean/age0": 1.0, "actor/kl_ref": 0.01 * k,
                  "actor/kl_prev": 0.001, "actor/entropy": 0.5, "actor/clip_frac": 0.02,
                  "self_reflection_rate": 0.0}
        if mix and k > 1:
            record["actor/ratio_mean/age1"] = 1.02
            record["actor/ratio_mean/age10"] = 1.03
        if drift:
            record.update({"drift/kl_prev_fresh": 0.002, "drift/tv_prev_fresh": 0.01, "drift/malformed_rate": 0.0,
                           "drift/abs_w_minus_1/age1": 0.05, "drift/outside_window/age1": 0.01})
        records.append(record)
    return records


def test_phases_and_reincarnation_come_from_the_records():
    records = history()
    # Mix from 0 to the end of step 3 (30 rollouts), on-policy after; reincarnation marked at T = 3
    assert phases(records) == [(0.0, 30, True), (30, 60, False)]
    assert reincarnation_point(records) == (3, 30)
    assert reincarnation_point(history(T=10)) is None  # never reached: nothing marked
    assert phases(history(T=0)) == [(0.0, 60, False)]


def test_titles_say_when_a_metric_is_absent_or_flat_zero():
    spec = next(s for s in PLOTS if s.file == "self_reflection.png")
    assert plot_title(spec, []) == f"{spec.title}\n(not logged in this run)"
    flat = [("self_reflection_rate", [(1, 0.0), (2, 0.0)])]
    assert plot_title(spec, flat) == f"{spec.title}\n(flat zero in this run)"
    assert plot_title(spec, [("self_reflection_rate", [(1, 0.0), (2, 0.1)])]) == spec.title


def test_every_plot_is_written_and_drift_plots_when_logged(tmp_path):
    core = {s.file for s in PLOTS if not s.optional}
    assert {p.name for p in write_plots(history(), tmp_path / "a")} == core
    written = {p.name for p in write_plots(history(drift=True), tmp_path / "b")}
    assert written == core | {"drift_prev_fresh.png", "drift_ratio_deviation.png", "drift_outside_window.png",
                              "drift_malformed.png"}
    assert all((tmp_path / "b" / name).stat().st_size > 20_000 for name in written)  # 8 x 4.8 in at 110 dpi


def test_ages_are_found_and_sorted_naturally():
    spec = next(s for s in PLOTS if s.file == "importance_ratio.png")
    assert spec.metrics([history()]) == ["actor/ratio_mean", "actor/ratio_mean/age0", "actor/ratio_mean/age1",
                                         "actor/ratio_mean/age10"]


def test_readable_names_for_sweep_panels():
    assert describe("eval_accuracy") == ("held-out accuracy (greedy)", "accuracy (fraction correct)")
    assert describe("actor/ratio_mean/age2") == ("importance ratio pi_theta / behaviour, by sample age: age 2", "ratio")
    assert describe("custom/key") == ("custom/key", "")


def test_plot_command_overlays_runs_including_a_running_one(tmp_path, capsys):
    for name, records in (("p0.2", history(T=3)), ("p0.4", history(T=4))):
        run = tmp_path / "sweep" / name
        run.mkdir(parents=True)
        text = "".join(json.dumps(r) + "\n" for r in records)
        if name == "p0.4":
            text += '{"iteration": 7, "rollou'  # the line a running run is writing
        (run / "metrics.jsonl").write_text(text)
    assert run_names([tmp_path / "sweep" / "p0.2", tmp_path / "sweep" / "p0.4"]) == ["p0.2", "p0.4"]
    out = tmp_path / "overlay"
    assert main(["plot", str(tmp_path / "sweep" / "p0.2"), str(tmp_path / "sweep" / "p0.4"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"plot: {out / 'accuracy.png'}" in printed and len(printed) == len([s for s in PLOTS if not s.optional])
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
