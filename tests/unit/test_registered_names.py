"""Every closed set of names has one source, its registry: registering a name makes the config accept it
(no second list to update), an unregistered one is refused with the registered names listed, and what
callers decide from a name (a critic, a TP-sharded engine, a family's HF names) is read off its entry."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from remix_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    needs_critic,
)
from remix_megatron.config import ConfigError, ModelConfig, load_config
from remix_megatron.config.presets import model_values_from_hf_config
from remix_megatron.convert.hf import hf_config_from_model, name_map
from remix_megatron.families import MODEL_FAMILIES
from remix_megatron.metrics_log import LOGGERS, LoggerSpec, open_loggers
from remix_megatron.planning import plan_memory, total_parameters
from remix_megatron.rewards import REWARDS
from remix_megatron.rollout import ENGINES
from remix_megatron.store.sampler import REPLAY_WEIGHTINGS
from remix_megatron.store.store import COMPRESSIONS
from remix_megatron.validation import validate
from tests.conftest import REPO

pytestmark = pytest.mark.unit

PPO = str(REPO / "configs" / "tiny_remix_ppo.yaml")
# every config key whose value names a registry entry (written out here, independently of validation.REGISTERED)
NAMED = {"model.family": MODEL_FAMILIES, "algorithm.policy_loss": POLICY_LOSSES,
         "algorithm.advantage_estimator": ADVANTAGE_ESTIMATORS, "algorithm.loss_agg": LOSS_AGGREGATIONS,
         "algorithm.kl_estimator": KL_ESTIMATORS, "store.replay_weighting": REPLAY_WEIGHTINGS,
         "store.compression": COMPRESSIONS, "data.reward": REWARDS, "rollout.engine": ENGINES}


@contextmanager
def registered(registry, name, entry):
    """``registry`` with ``name`` added for the block (registries have no unregister: only tests take one back)."""
    registry.register(name, entry)
    try:
        yield
    finally:
        del registry._entries[name]


def _check(*overrides: str):
    return validate(load_config(PPO, list(overrides)), training=False)


@pytest.mark.parametrize("key", sorted(NAMED))
def test_registering_a_name_makes_it_valid_and_only_then(key):
    registry, (section, field) = NAMED[key], key.split(".")
    default = getattr(getattr(load_config(PPO, []), section), field)
    with pytest.raises(ConfigError) as info:
        _check(f"{key}=dummy_entry")
    assert f"{key}: unknown {registry.kind} 'dummy_entry'. Known: {', '.join(registry.names())}" in str(info.value)
    with registered(registry, "dummy_entry", registry.get(default)):  # the default's entry under a new name
        assert _check(f"{key}=dummy_entry").data_parallel == 1
    assert "dummy_entry" not in registry


@pytest.mark.parametrize("critic", [True, False])
def test_the_planner_asks_the_estimator_whether_it_needs_a_critic(critic):
    entry = dataclasses.replace(ADVANTAGE_ESTIMATORS.get("grpo"), needs_critic=critic)
    with registered(ADVANTAGE_ESTIMATORS, "dummy_estimator", entry):
        assert needs_critic("dummy_estimator") is critic
        stage = plan_memory(load_config(PPO, ["algorithm.advantage_estimator=dummy_estimator"])).stages[0]
    assert ("critic weights" in stage.rows) is critic and (stage.critic_parameters > 0) is critic
    assert needs_critic("vtrace_gae") and needs_critic("gae") and not needs_critic("grpo")


def test_the_planner_reads_engine_sharding_from_the_entry():
    tp2 = ["parallel.tensor_parallel=2"]
    with registered(ENGINES, "dummy_sharded", dataclasses.replace(ENGINES.get("hf"), tp_sharded=True)):
        sharded = plan_memory(load_config(PPO, [*tp2, "rollout.engine=dummy_sharded"]), 2).engine
    full = plan_memory(load_config(PPO, tp2), 2).engine
    parameters = total_parameters(load_config(PPO, []).model)
    assert full.weight_bytes == parameters * 4  # CPU: a full fp32 replica on every rank
    assert sharded.weight_bytes == parameters * 2 // 2  # bf16, split over the TP group
    assert [name for name in ENGINES if ENGINES.get(name).tp_sharded] == ["sglang", "vllm"]


def test_naming_the_gpu_engines_imports_none_of_them():
    code = ("import sys; from remix_megatron.validation import REGISTERED; from remix_megatron.rollout import ENGINES;"
            "assert 'vllm' in ENGINES and 'sglang' in ENGINES;"
            "print(sorted(m for m in sys.modules if m.endswith(('vllm_engine', 'sglang_engine', 'hf_engine'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


HF = dict(model_type="dummy_type", num_hidden_layers=2, hidden_size=64, intermediate_size=176, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-6, attention_bias=True)


def test_a_model_family_is_one_registry_entry():
    """Registered once, a family's config.json is read, exported and mapped with its own names."""
    family = dataclasses.replace(MODEL_FAMILIES.get("llama"), model_type="dummy_type", actor_architecture="DummyLM",
                                 critic_architecture="DummyForTokenClassification")
    with registered(MODEL_FAMILIES, "dummy_family", family):
        model = ModelConfig(**model_values_from_hf_config(HF))
        actor = hf_config_from_model(model, critic=False, dtype=torch.float32)
        critic = hf_config_from_model(model, critic=True, dtype=torch.float32)
        rows = {row.megatron: row.hf for row in name_map(model)}
    assert (model.family, model.add_qkv_bias, model.num_layers) == ("dummy_family", True, 2)
    assert (actor["architectures"], actor["model_type"], actor["attention_bias"], actor["mlp_bias"]) == (
        ["DummyLM"], "dummy_type", True, False)
    assert critic["architectures"] == ["DummyForTokenClassification"]
    assert rows["decoder.layers.1.self_attention.linear_qkv.bias"] == (
        "model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias",
        "model.layers.1.self_attn.v_proj.bias")
    with pytest.raises(ConfigError, match=r"model_type 'dummy_type' is not supported \(supported: llama, qwen2\)"):
        model_values_from_hf_config(HF)


def test_families_differ_only_where_their_entries_say():
    """Qwen2 always has the QKV bias (config.json has no key for it); Llama reads and writes attention_bias."""
    qwen2, llama = MODEL_FAMILIES.get("qwen2"), MODEL_FAMILIES.get("llama")
    assert qwen2.qkv_bias({"attention_bias": False}) and qwen2.hf_fields(True) == {}
    assert not llama.qkv_bias({}) and llama.qkv_bias({"attention_bias": True})
    assert llama.hf_fields(False) == {"attention_bias": False, "mlp_bias": False}


def test_a_registered_logger_is_valid_and_opens():
    cfg = load_config(PPO, ["trainer.loggers=[jsonl,dummy_logger]"])
    with pytest.raises(ConfigError, match=r"trainer.loggers: unknown logger 'dummy_logger'\. Known: jsonl, tensorb"):
        validate(cfg, training=False)
    opened = []
    spec = LoggerSpec(open=lambda trainer, run_dir, config, first: opened.append((run_dir, first)) or "opened")
    with registered(LOGGERS, "dummy_logger", spec):
        validate(cfg, training=False)
        assert open_loggers(cfg.trainer, REPO, {}, 3) == ["opened"] and opened == [(REPO, 3)]
