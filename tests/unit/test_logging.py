"""Run logging: wandb's own mode resolution, the loggers' availability check, the console line."""

from __future__ import annotations

import sys

import pytest

from remix_megatron.config import ConfigError, load_config
from remix_megatron.console import format_rate, format_value, iteration_line
from remix_megatron.metrics_log import WandbLogger, check_loggers, scalars, wandb_credentials_found
from remix_megatron.validation import validate
from tests.conftest import REPO

pytestmark = pytest.mark.unit

KEY = "a" * 40  # the shape of a wandb API key; never sent anywhere (no online run starts here)


@pytest.fixture
def clean_home(tmp_path, monkeypatch):
    """No wandb credentials or mode anywhere: an empty HOME and no WANDB_* variables."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_credentials_come_from_wandb_login_netrc_too(clean_home, monkeypatch):
    assert not wandb_credentials_found()
    (clean_home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    (clean_home / ".netrc").chmod(0o600)
    assert wandb_credentials_found()  # what `wandb login` writes; the old check read WANDB_API_KEY only
    (clean_home / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_credentials_found()


def test_wandb_mode_env_is_respected(clean_home, monkeypatch, capsys):
    """WANDB_MODE=disabled is wandb's own switch: no run directory, no offline files (was forced offline)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(REPO / "configs" / "tiny_remix_ppo.yaml", ["trainer.loggers=[wandb]"])
    logger = WandbLogger(cfg.trainer, clean_home / "run", {})
    logger.log({"reward_mean": 0.5}, step=1)
    logger.close()
    assert "wandb (disabled)" in capsys.readouterr().out
    assert not (clean_home / "run" / "wandb").exists()


def test_offline_without_credentials_names_the_sync_directory(clean_home, capsys):
    cfg = load_config(REPO / "configs" / "tiny_remix_ppo.yaml", ["trainer.loggers=[wandb]", "trainer.wandb_group=g",
                                                                 "trainer.wandb_tags=[a,b]"])
    (clean_home / "run").mkdir()
    logger = WandbLogger(cfg.trainer, clean_home / "run", {})
    assert logger.run.group == "g" and list(logger.run.tags) == ["a", "b"] and logger.run.name == "run"
    logger.close()
    line = capsys.readouterr().out.strip().splitlines()[0]
    offline = sorted((clean_home / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and line.endswith(f"upload later with: wandb sync {offline[0]}")


def test_missing_tensorboard_is_a_config_error_before_the_run(monkeypatch):
    assert check_loggers(["jsonl", "tensorboard"]) == []  # the test extra installs it
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets where it is missing
    assert check_loggers(["jsonl", "tensorboard"]) == ["trainer.loggers has tensorboard, which is not installed: pip "
                                                       "install tensorboard (or pip install -e .[tensorboard])"]
    assert check_loggers(["jsonl"]) == []


def test_unknown_logger_is_refused():
    cfg = load_config(REPO / "configs" / "tiny_remix_ppo.yaml", ["trainer.loggers=[mlflow]"])
    known = r"trainer.loggers: unknown logger 'mlflow'\. Known: jsonl, tensorboard, wandb"
    with pytest.raises(ConfigError, match=known):
        validate(cfg, training=False)


def test_scalars_keep_finite_numbers():
    assert scalars({"iteration": 3, "a": 1, "b": 0.5, "c": float("nan"), "d": "x", "e": True}) == \
        {"a": 1.0, "b": 0.5, "e": 1.0}


@pytest.mark.parametrize(("count", "seconds", "expected"), [(1, 3.0, "0.333"), (2, 5.0, "0.4"), (96, 0.5, "192"),
                                                            (1000, 3.0, "333")])
def test_rate_is_not_rounded_to_zero(count, seconds, expected):
    assert format_rate(count, seconds) == expected  # the old line printed "0 rollouts/s" below 0.5


def test_console_line_shows_the_selected_metrics():
    record = {"iteration": 3, "reward_mean": 0.25, "actor/lr": 2e-4, "actor/kl_ref": 0.0123, "rollouts": 1,
              "rollouts_total": 48, "time/iteration_s": 3.0}
    line = iteration_line(3, 10, record, ["reward_mean", "actor/kl_ref", "actor/lr", "not/logged"])
    assert line == ("[3/10] reward 0.250 kl_ref 0.012 lr 2.00e-04 rollouts 48 | 3.0 s/it, 0.333 rollouts/s, "
                    "~0.3 min left")
    assert format_value(12) == "12" and format_value(0.0) == "0.000" and format_value(3e-7) == "3.00e-07"
