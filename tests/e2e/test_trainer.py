"""The RL loop end to end on the tiny model: exact rollout accounting, the ReMix schedule, and a
resumed run that is bitwise the uninterrupted one (generation included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remix_megatron.algorithms import rollout_cost
from remix_megatron.config import load_config
from tests.conftest import NO_EVAL, REPO, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_dir():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


def overrides(tiny: Path, run: Path, steps: int) -> list[str]:
    return [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl", f"data.eval_path={tiny}/heldout.jsonl",
            "rollout.prompts_per_step=32", "data.eval_size=32", "data.eval_interval=2",
            "algorithm.reincarnation_step=2", "trainer.save_interval=2", "trainer.resume=true",
            f"trainer.num_steps={steps}", f"trainer.run_dir={run}",
            "algorithm.fresh_multiple_of=8", "trainer.global_batch_size=32"]  # one step per pass, as when written


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loop_accounting_schedule_and_exact_resume(tiny_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The interruption is a 2-step run extended to 4; a decaying lr depends on num_steps, so it stays constant here.
    constant = "actor_optimizer.lr_decay=constant"
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, straight, 4), constant])
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, resumed, 2), constant])
    out = run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, resumed, 4), constant]).stdout
    assert "[3/4]" in out and "[1/4]" not in out
    a, b = metrics(straight), metrics(resumed)
    assert [r["iteration"] for r in a] == [0, 1, 2, 3, 4] and [r["iteration"] for r in b] == [0, 1, 2, 3, 4]
    cfg = load_config("configs/tiny_remix_ppo.yaml", overrides(tiny_dir, straight, 4))
    # 2 ReMix iterations (16 fresh of 32, the first without anything to replay), then reincarnated: 32 fresh
    assert a[-1]["rollouts_total"] == rollout_cost(4, cfg.algorithm, prompts_per_step=32, responses_per_prompt=1) == 96
    assert [r["reincarnated"] for r in a[1:]] == [False, False, True, True]
    assert [r["replayed_groups"] for r in a[1:]] == [0, 16, 0, 0] and a[2]["utd"] == 2 and a[3]["utd"] == 1
    for key in ("reward_mean", "actor/pg_loss", "actor/ratio_mean", "critic/value_loss", "eval_accuracy",
                "rollouts_total", "response_length"):
        assert [r.get(key) for r in a[3:]] == [r.get(key) for r in b[3:]], key  # bitwise: same floats
    assert (straight / "checkpoints" / "latest").read_text() == "iter_0000004"
    from remix_megatron.store import open_store

    store = open_store(straight / "store")  # one published iteration per step, as many rows as fresh prompts
    assert store.iterations() == [1, 2, 3, 4]
    assert [store.info(i).rows for i in (1, 2, 3, 4)] == [16, 16, 32, 32]
    assert all(r.iteration == 2 for r in store.read_iteration(2))
    # the reference becomes pi_T before step T+1: its first (and, at UTD 1, only) pass sees KL 0
    assert a[3]["actor/kl_ref"] == 0.0 and a[2]["actor/kl_ref"] > 0.0
    for record in a[1:]:
        numbers = [v for v in record.values() if isinstance(v, float)]
        assert numbers and all(v == v and abs(v) != float("inf") for v in numbers), record


def test_drift_control_adapts_the_lr_and_resumes_exactly(tiny_dir, tmp_path):
    """A band every move is above: the actor's lr halves each iteration after the first (whose TV
    is 0: pi_1 = pi_0), and a run resumed after iteration 2 continues the adapted lr bitwise."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    control = ["actor_optimizer.lr_decay=constant", "algorithm.drift_control=true", "algorithm.drift_tv_low=0",
               "algorithm.drift_tv_high=1e-9", "algorithm.drift_lr_factor=2", "algorithm.drift_lr_min_scale=0.01",
               *NO_EVAL]
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, straight, 4), *control])
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, resumed, 2), *control])
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, resumed, 4), *control])
    a, b = ([r for r in metrics(run) if r["iteration"] > 0] for run in (straight, resumed))
    lr = load_config("configs/tiny_remix_ppo.yaml").actor_optimizer.lr
    assert a[0]["drift/tv_prev_fresh"] == 0.0 and all(r["drift/tv_prev_fresh"] > 1e-9 for r in a[1:])
    assert [r["actor/lr"] for r in a] == pytest.approx([lr, lr / 2, lr / 4, lr / 8])
    for key in ("actor/lr", "actor/pg_loss", "drift/tv_prev_fresh", "reward_mean"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bitwise across the resume


def test_tp2_pp2_config_matches_one_process(tiny_dir, tmp_path):
    """Iterations 1-3 (Mix phase, replay, reincarnation) at TP2 x PP2 on 4 processes: the first
    iteration's rollouts are identical and its losses equal (1e-5); the schedule is the same."""
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    common = lambda run: [*overrides(tiny_dir, run, 3), *NO_EVAL, "trainer.save_interval=-1"]  # noqa
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *common(single)])
    run_cli(["train", "configs/tiny_remix_ppo_tp2pp2.yaml", *common(parallel)], nproc=4)
    by_iteration = lambda run: {r["iteration"]: r for r in metrics(run)}  # noqa: E731 (no eval: no iteration 0)
    a, b = by_iteration(single)[1], by_iteration(parallel)[1]
    for key in ("reward_mean", "rollouts_total", "response_length"):
        assert a[key] == b[key], key
    for key in ("actor/pg_loss", "actor/ratio_mean", "actor/kl_ref", "critic/value_loss", "actor/entropy"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    later = [by_iteration(parallel)[k] for k in (2, 3)]
    assert ([(r["replayed_groups"], r["reincarnated"], r["rollouts_total"]) for r in later]
            == [(16, False, 32), (0, True, 64)])
    assert later[1]["actor/kl_ref"] == 0.0


def test_wandb_offline_plots_and_periodic_benchmarks(tiny_dir, tmp_path):
    run = tmp_path / "run"
    data = REPO.parent / "shared" / "data"
    out = run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, run, 2), "trainer.loggers=[wandb]",
                   "trainer.save_interval=-1", "data.eval_benchmarks=math500,aime24", "data.eval_benchmark_size=6",
                   f"data.benchmark_dir={data}", "data.overlong=truncate", "data.eval_samples=2",
                   "trainer.global_batch_size=16", "actor_optimizer.lr=2e-4", "actor_optimizer.lr_decay=linear",
                   "actor_optimizer.min_lr_ratio=0.5"]).stdout
    assert "wandb (offline) run directory:" in out
    assert list((run / "wandb").glob("offline-run-*"))
    for name in ("accuracy.png", "reward.png", "importance_ratio.png", "response_length.png", "self_reflection.png",
                 "benchmarks.png"):
        assert (run / name).stat().st_size > 1000, name
    # minibatches of 16, UTD 2: iteration 1 trains on 16 fresh rows (1 step per pass), iteration 2 on 16 + 16
    # replayed (2 per pass); the metrics cover both passes
    assert [(r["actor/optimizer_steps"], r["critic/optimizer_steps"]) for r in metrics(run)[1:]] == [(2, 2), (4, 4)]
    assert [r["actor/lr"] for r in metrics(run)[1:]] == pytest.approx([2e-4, 1e-4])  # linear, 2 steps, to 50%
    evaluated = [r for r in metrics(run) if "eval/math500" in r]
    assert [r["iteration"] for r in evaluated] == [0, 2]  # before training and every data.eval_interval=2
    import pyarrow.parquet as pq

    for record in evaluated:
        for name in ("math500", "aime24"):
            rows = pq.read_table(run / "eval" / f"iter_{record['iteration']:07d}" / name / "generations.parquet")
            rows = rows.to_pylist()
            assert len(rows) == 6 * 2 and {r["sample"] for r in rows} == {0, 1}  # 6 problems x eval_samples
            assert record[f"eval/{name}"] == pytest.approx(sum(r["correct"] for r in rows) / 12)
        assert record["eval/average"] == pytest.approx((record["eval/math500"] + record["eval/aime24"]) / 2)
        assert 0 <= record["eval/heldout/format_rate"] <= 1 and "eval_accuracy" in record


def test_controls_no_update_and_shuffled_rewards(tiny_dir, tmp_path):
    """The benchmark's controls: no_update leaves the policy (and its accuracy) exactly as it was;
    shuffled_rewards stores a permutation of the true rewards, detached from the responses."""
    from safetensors.torch import load_file

    from remix_megatron.data import load_tokenizer
    from remix_megatron.rewards import MathGrader
    from remix_megatron.store import open_store

    frozen = tmp_path / "frozen"
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, frozen, 2), "trainer.save_interval=-1",
             "trainer.control=no_update"])
    accuracy = [r["eval_accuracy"] for r in metrics(frozen) if "eval_accuracy" in r]
    assert len(accuracy) == 2 and accuracy[0] == accuracy[1]
    assert all(r["actor/step_skipped"] == r["actor/optimizer_steps"] >= 2 and r["actor/pg_loss"] == r["actor/pg_loss"]
               for r in metrics(frozen)[1:])  # every step of both UTD passes discarded
    base = load_file(str(tiny_dir / "model.safetensors"))
    after = {k: v for f in (frozen / "hf_actor").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert all(bool((base[k] == after[k]).all()) for k in base)

    shuffled = tmp_path / "shuffled"
    run_cli(["train", "configs/tiny_remix_ppo.yaml", *overrides(tiny_dir, shuffled, 1), "trainer.save_interval=-1",
             *NO_EVAL, "trainer.control=shuffled_rewards"])
    records = open_store(shuffled / "store").read_iteration(1)
    tokenizer = load_tokenizer(tiny_dir)
    answers = {json.loads(line)["id"]: json.loads(line)["answer"]
               for line in (tiny_dir / "train.jsonl").read_text().splitlines()}
    truth, _ = MathGrader()([tokenizer.decode(r.response_tokens, skip_special_tokens=True) for r in records],
                            [answers[r.prompt_id] for r in records])
    stored = [r.reward for r in records]
    assert 0 < sum(truth) < len(truth)  # both kinds present, so a permutation can tell
    assert sorted(stored) == sorted(truth) and stored != truth
