"""Strict YAML loading, overrides with type checks, validation messages, reference YAML."""

from __future__ import annotations

import dataclasses
import textwrap
import typing

import pytest
import yaml

from remix_megatron.config import (
    MODEL_PRESETS,
    ConfigError,
    ExperimentConfig,
    load_config,
    read_yaml,
    reference_yaml,
    save_config,
    validate_layout,
)
from tests.conftest import REPO

pytestmark = pytest.mark.unit

TINY = ["model.preset=qwen2-tiny"]


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_preset_fills_model_and_yaml_overrides_it(tmp_path):
    path = write(tmp_path, """
        model: {preset: qwen2-tiny, num_layers: 2}
        parallel: {tensor_parallel: 2}
    """)
    cfg = load_config(path)
    preset = MODEL_PRESETS.get("qwen2-tiny")
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == preset["hidden_size"]
    assert cfg.parallel.tensor_parallel == 2 and cfg.parallel.pipeline_parallel == 1
    assert cfg.actor_optimizer.lr == 1e-6 and cfg.critic_optimizer.lr == 1e-5  # paper defaults


def test_cli_overrides_win_over_yaml_and_convert_types(tmp_path):
    path = write(tmp_path, "model: {preset: qwen2-tiny}\ntrainer: {seed: 1}\n")
    cfg = load_config(path, ["trainer.seed=7", "actor_optimizer.lr=3e-4", "parallel.sequence_parallel=false",
                             "model.preset=r1-distill-qwen-1.5b"])
    assert cfg.trainer.seed == 7 and cfg.actor_optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.hidden_size == 1536  # the override's preset, not the YAML's


def test_config_is_frozen():
    cfg = load_config(None, TINY)
    with pytest.raises(Exception):
        cfg.trainer.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(("text", "expected"), [
    ("model: {preset: qwen2-tiny, hiden_size: 3}\n",
     "unknown key 'model.hiden_size'.*did you mean 'model.hidden_size'"),
    ("model: {preset: qwen2-tiny}\nparalel: {}\n", "unknown key 'paralel'.*did you mean 'parallel'"),
    ("model: {preset: qwen2-tiny}\ntrainer: {micro_batch: 2}\n", "did you mean 'trainer.micro_batch_size'"),
    ("model: {preset: qwen2-tiny}\nparallel: 4\n", "'parallel' .* must be a mapping"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_yaml_errors_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


@pytest.mark.parametrize(("override", "expected"), [
    ("parallel.tensor_parallel=abc", "parallel.tensor_parallel.*could not be converted to Integer"),
    ("parallel.tensor_parallel=2.5", "parallel.tensor_parallel.*could not be converted to Integer"),
    ("trainer.seed=true", "trainer.seed"),
    ("actor_optimizer.lr=fast", "actor_optimizer.lr.*Float"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
    ("model.hidden=3", "unknown key 'model.hidden'.*did you mean 'model.hidden_size'"),
    ("tensor_parallel=2", "unknown key 'tensor_parallel'"),
    ("parallel.tensor_parallel", "must look like section.key=value"),
    ("model=3", "'model' .* must be a mapping"),
])
def test_bad_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [*TINY, override])


@pytest.mark.parametrize(("override", "expected"), [
    ("parallel.backend=mpi", "parallel.backend='mpi' is not one of auto, gloo, nccl"),
    ("parallel.tensor_parallel=0", "tensor_parallel=0 must be > 0"),
    ("parallel.virtual_pipeline=2", "virtual_pipeline=2 needs parallel.pipeline_parallel > 1"),
    ("parallel.sequence_parallel=true", "sequence_parallel=true needs parallel.tensor_parallel > 1"),
    ("model.num_query_groups=3", "num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    ("model.hidden_size=130", "hidden_size=130 is not divisible by model.num_attention_heads=4"),
    ("model.family=gpt2", r"model.family: unknown model family 'gpt2'\. Known: llama, qwen2"),
    ("actor_optimizer.lr=0", "lr=0.0 must be > 0"),
    ("trainer.global_batch_size=6", "global_batch_size=6 is not divisible by trainer.micro_batch_size=4"),
    ("model.preset=qwen2-tin", "unknown model preset 'qwen2-tin'.*did you mean 'qwen2-tiny'"),
])
def test_section_validation_messages(override, expected):
    extra = ["trainer.micro_batch_size=4"] if "global_batch" in override else []
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [*TINY, *extra, override])


def test_required_model_field_without_preset():
    with pytest.raises(ConfigError, match="'model.family' is required.*model.preset"):
        load_config(None, [])


@pytest.mark.parametrize(("overrides", "world", "expected"), [
    (["parallel.tensor_parallel=4", "model.num_attention_heads=6", "model.hidden_size=132",
      "model.num_query_groups=6"], 4, "model.num_attention_heads=6 is not divisible by parallel.tensor_parallel=4"),
    (["parallel.tensor_parallel=4"], 4, "model.num_query_groups=2 is not divisible by parallel.tensor_parallel=4"),
    (["parallel.pipeline_parallel=3"], 3, "model.num_layers=4 is not divisible by parallel.pipeline_parallel"),
    (["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 6,
     "world size 6 is not divisible by tensor_parallel\\*pipeline_parallel=4"),
    (["parallel.tensor_parallel=2", "model.vocab_size=1001"], 2, "vocab_size=1001 is not divisible"),
    (["trainer.global_batch_size=6", "trainer.micro_batch_size=2"], 2,
     "global_batch_size=6 is not divisible by micro_batch_size\\*data_parallel=4"),
    (["trainer.seq_length=4096"], 1, "seq_length=4096 exceeds model.max_position_embeddings=1024"),
])
def test_layout_errors(overrides, world, expected):
    cfg = load_config(None, [*TINY, *overrides])
    with pytest.raises(ConfigError, match=expected):
        validate_layout(cfg, world)


def test_layout_reports_every_error_at_once():
    cfg = load_config(None, [*TINY, "parallel.tensor_parallel=8", "parallel.pipeline_parallel=3"])
    with pytest.raises(ConfigError) as info:
        validate_layout(cfg, 24)
    message = str(info.value)
    for name in ("num_attention_heads=4", "num_query_groups=2", "num_layers=4"):
        assert name in message


def test_valid_layout_returns_data_parallel():
    cfg = load_config(None, [*TINY, "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
                             "trainer.global_batch_size=8", "trainer.micro_batch_size=2"])
    assert validate_layout(cfg, 8) == 2


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, [*TINY, "parallel.tensor_parallel=2", "trainer.seed=9"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml", header={"world_size": 4})
    assert path.read_text().startswith("# world_size: 4\n")
    assert load_config(path) == cfg


def test_reference_yaml_is_current_and_complete():
    """configs/reference.yaml is generated; regenerate with `make reference-config`."""
    text = reference_yaml()
    assert (REPO / "configs" / "reference.yaml").read_text() == text
    data = yaml.safe_load(text)
    hints = typing.get_type_hints(ExperimentConfig)
    for section in dataclasses.fields(ExperimentConfig):
        assert set(data[section.name]) == {f.name for f in dataclasses.fields(hints[section.name])}
    assert data["actor_optimizer"]["lr"] == 1e-6 and data["parallel"]["tensor_parallel"] == 1
    assert data["model"]["hidden_size"] == "???"


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "reference.yaml"))
def test_shipped_configs_load(path):
    read_yaml(path)
    assert isinstance(load_config(path), ExperimentConfig)


@pytest.mark.parametrize("override", ["rollout.temperature=0.7", "rollout.top_p=0.95", "rollout.top_k=50"])
def test_training_refuses_sampling_other_than_the_losses_policy(override):
    """The actor's log-probs (and the engines') are of the untempered, untruncated policy: rollouts
    sampled otherwise would make every importance ratio wrong, so training refuses up front."""
    from remix_megatron.config import ConfigError, load_config
    from remix_megatron.trainer import train

    with pytest.raises(ConfigError, match="training rollouts must come from the policy the losses use"):
        train(load_config("configs/tiny_remix_ppo.yaml", [override]))
