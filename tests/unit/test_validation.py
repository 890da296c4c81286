"""One validation path (remix_megatron/validation.py), driven through the CLI as a user runs it:
`config check`, `dryrun` and `sweep --dry-run` refuse what `train` refuses, each user error is
one clear line on stderr (exit 2, no traceback), and the config-level bad inputs are named."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from remix_megatron.cli import main, parse_args
from remix_megatron.config import ConfigError, load_config
from remix_megatron.validation import validate
from tests.conftest import REPO

pytestmark = pytest.mark.unit

PPO = str(REPO / "configs" / "tiny_remix_ppo.yaml")


@pytest.fixture(scope="module")
def tiny():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


@pytest.fixture
def ready(tiny):
    """Overrides that make the tiny ReMix-PPO config trainable on this machine."""
    return [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl", f"data.eval_path={tiny}/heldout.jsonl"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_config_check_accepts_a_trainable_config(capsys, ready):
    assert main(["config", "check", PPO, *ready]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: world size 1 = TP1 x PP1 x DP1"


@pytest.mark.parametrize(("override", "expected"), [
    ("algorithm.policy_loss=foo", "config error: algorithm.policy_loss: unknown policy loss 'foo'"),
    ("rollout.temperature=0.7", "config error: rollout.temperature=0.7, top_p=1.0, top_k=-1: training rollouts"),
    ("trainer.seed=-1", "config error: trainer.seed=-1 must be >= 0"),
    ("actor_optimizer.lr=inf", "config error: actor_optimizer.lr=inf must be a finite number"),
    ("cluster.gpu_memory_gib=.inf", "config error: cluster.gpu_memory_gib=inf must be a finite number"),
    ("data.eval_benchmarks=nosuch", "config error: evaluation sets: unknown benchmark 'nosuch'"),
])
def test_config_check_refuses_what_train_refuses(capsys, ready, override, expected):
    assert main(["config", "check", PPO, *ready, override]) == 2
    assert one_error_line(capsys).startswith(expected)


def test_train_refuses_through_the_same_function(ready):
    """train() runs validate() before it starts processes, models or engines."""
    from remix_megatron.trainer import train

    with pytest.raises(ConfigError, match="algorithm.advantage_estimator: unknown advantage estimator 'gea'"):
        train(load_config(PPO, [*ready, "algorithm.advantage_estimator=gea"]))


def test_missing_checkpoint_is_an_error_to_check_and_a_note_to_the_dry_run(capsys):
    assert main(["config", "check", PPO]) == 2
    assert "model.hf_path is required for training" in capsys.readouterr().err
    assert main(["dryrun", PPO]) == 0  # the memory plan needs no weights: the launch may still give them
    assert "note: train will refuse this config as it stands: model.hf_path is required" in capsys.readouterr().out


def test_dryrun_refuses_sampling_the_losses_do_not_assume(capsys):
    assert main(["dryrun", PPO, "rollout.temperature=0.7"]) == 2
    assert one_error_line(capsys).startswith("config error: rollout.temperature=0.7")


def test_config_check_uses_the_cluster_world_size_like_dryrun(capsys, ready):
    cluster = ["cluster.gpus_per_node=2", "parallel.tensor_parallel=2"]
    assert main(["config", "check", PPO, *ready, *cluster]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: world size 2 = TP2 x PP1 x DP1"
    assert main(["dryrun", PPO, *cluster]) == 0
    assert "world size 2" in capsys.readouterr().out.lower()


def test_overrides_are_accepted_after_options(capsys, ready):
    assert main(["config", "check", PPO, "--world-size", "2", *ready, "trainer.seed=5"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: world size 2 = TP1 x PP1 x DP2"
    args = parse_args(["dryrun", PPO, "a.b=1", "--world-size", "4", "c.d=2", "--gpu-memory-gib", "80", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.world_size == 4 and args.gpu_memory_gib == 80


def test_unknown_options_are_still_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["dryrun", PPO, "--wrld-size", "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --wrld-size" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_world_size_must_be_a_positive_count(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["config", "check", PPO, "--world-size", value])
    assert exit_info.value.code == 2 and "--world-size" in capsys.readouterr().err


def test_string_overrides_keep_yaml_special_text():
    cfg = load_config(PPO, ["data.template=Q: {problem} [A]: #1", "trainer.run_dir=runs/a: b", "trainer.seed=7"])
    assert cfg.data.template == "Q: {problem} [A]: #1" and cfg.trainer.run_dir == "runs/a: b"
    assert cfg.trainer.seed == 7  # other fields still parse as YAML scalars
    with pytest.raises(ConfigError, match=r"override trainer.seed='\[1': not a valid value"):
        load_config(PPO, ["trainer.seed=[1"])


def test_duplicate_yaml_key_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(textwrap.dedent("""\
        model: {preset: qwen2-tiny}
        trainer:
          seed: 1
          num_steps: 5
          seed: 2
    """))
    assert main(["config", "show", str(path)]) == 2
    assert one_error_line(capsys) == (f"config error: {path}: line 5: key 'seed' is given twice (YAML would keep the "
                                      "last silently); keep one")


@pytest.mark.parametrize("text", ["trainer: {run_dir: '${oc.env:HOME}/runs'}\n",
                                  "data: {template: '${x} {problem}'}\n"])
def test_interpolation_is_refused_in_yaml(tmp_path, capsys, text):
    path = tmp_path / "interp.yaml"
    path.write_text("model: {preset: qwen2-tiny}\n" + text)
    assert main(["config", "show", str(path)]) == 2
    assert "interpolation (${...}) is not supported" in one_error_line(capsys)


def test_interpolation_is_refused_in_overrides(capsys):
    assert main(["config", "show", PPO, "trainer.run_dir=${oc.env:HOME}"]) == 2
    line = one_error_line(capsys)
    assert "'trainer.run_dir' in command-line overrides holds '${oc.env:HOME}'" in line


def test_reincarnation_after_the_last_step_is_a_warning(capsys, ready):
    T40 = "algorithm.reincarnation_step=40"
    assert main(["config", "check", PPO, *ready, T40, "trainer.num_steps=30"]) == 0
    out = capsys.readouterr().out
    assert ("warning: algorithm.reincarnation_step=40 > trainer.num_steps=30: this run never reincarnates" in out)
    assert main(["config", "check", PPO, *ready, T40, "trainer.num_steps=40"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_every_problem_is_listed_at_once(ready):
    with pytest.raises(ConfigError) as error:
        validate(load_config(PPO, [*ready, "algorithm.policy_loss=foo", "trainer.seed=3", "rollout.top_k=5"]), 3)
    message = str(error.value)
    assert message.startswith("3 problems:") and "world size 3 is not divisible" not in message  # TP1: 3 is fine
    assert "unknown policy loss 'foo'" in message and "top_k=5" in message and "global_batch_size" in message


def test_sweep_dry_run_validates_like_train_and_prints_nproc(tmp_path, capsys, tiny):
    sweep = tmp_path / "sweep.yaml"
    spec = {"name": "t", "config": PPO, "out_dir": str(tmp_path / "out"), "nproc_per_node": 1,
            "grid": {"algorithm.policy_loss": ["mix_ppg", "ppo"]}}
    sweep.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(sweep), "--dry-run"]) == 2  # no model.hf_path: train would refuse every point
    assert "sweep point policy_loss-mix_ppg: " in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--dry-run", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[policy_loss-")]
    assert len(lines) == 2 and all(" NPROC_PER_NODE=1 bash " in line for line in lines)
    spec["grid"] = {"algorithm.policy_loss": ["mix_ppg", "foo"]}
    sweep.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(sweep), "--dry-run", f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl"]) == 2
    assert "sweep point policy_loss-foo: algorithm.policy_loss: unknown policy loss 'foo'" in capsys.readouterr().err


def test_sweep_aggregate_only_without_runs_is_an_error(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "t", "config": PPO, "out_dir": str(tmp_path / "out"),
                                     "grid": {"trainer.seed": [1, 2]}}))
    assert main(["sweep", str(sweep), "--aggregate-only"]) == 1
    assert "no point of sweep t has metrics" in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_verify_hf_on_one_process_says_how_to_launch(capsys, tiny):
    assert main(["convert", "verify-hf", str(REPO / "configs" / "tiny_cpu.yaml"), f"model.hf_path={tiny}"]) == 2
    line = one_error_line(capsys)
    assert "TP2 x PP2 (4 ranks) but this run has 1: start it with NPROC_PER_NODE=4 launch/torchrun.sh convert " \
           "verify-hf" in line


@pytest.mark.parametrize("flags,warned", [({"avx2", "fma"}, True), ({"avx2", "avx512_bf16"}, False),
                                          ({"amx_bf16"}, False), (set(), False)])
def test_bf16_on_a_cpu_without_native_bf16_is_a_warning(monkeypatch, capsys, ready, flags, warned):
    """An AVX2-only CPU emulates bf16 matmuls (5.5x slower per actor step than fp32, measured): say so
    before training; a CPU with AVX-512 BF16 or AMX, or one whose flags cannot be read, gets no warning."""
    import remix_megatron.validation as validation

    monkeypatch.setattr(validation, "cpu_flags", lambda: flags)
    assert main(["config", "check", PPO, *ready, "parallel.precision=bf16"]) == 0
    out = capsys.readouterr().out
    assert ("warning: parallel.precision=bf16 on a CPU without native bf16" in out) == warned, out
    assert main(["config", "check", PPO, *ready]) == 0
    assert "bf16" not in capsys.readouterr().out
