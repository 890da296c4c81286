"""HF <-> Megatron name maps and transforms, config mapping, and the errors users see."""

from __future__ import annotations

import json

import pytest
import torch

from remix_megatron.config import ConfigError, load_config
from remix_megatron.convert.hf import (
    ConversionError,
    HFWeights,
    MegatronFromHF,
    Row,
    check_model_matches_hf,
    fuse,
    hf_tensors,
    name_map,
    split,
)
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hf_dir(request, tmp_path_factory):
    return make_hf_model(request.param, tmp_path_factory.mktemp(request.param))


def test_qkv_layout_by_hand():
    cfg = load_config(None, ["model.preset=qwen2-tiny", "model.hidden_size=8", "model.num_attention_heads=4",
                             "model.num_query_groups=2"]).model  # head_dim 2, 2 query heads per group
    q = torch.arange(8).float().unsqueeze(1) + 100  # heads q0..q3, 2 rows each
    k = torch.arange(4).float().unsqueeze(1) + 200  # kv heads k0, k1
    v = torch.arange(4).float().unsqueeze(1) + 300
    row = Row("qkv", ("q", "k", "v"), "qkv")
    fused = fuse(row, [q, k, v], cfg)
    # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    assert fused.squeeze(1).tolist() == [100, 101, 102, 103, 200, 201, 300, 301,
                                         104, 105, 106, 107, 202, 203, 302, 303]
    assert all(torch.equal(a, b) for a, b in zip(split(row, fused, cfg), [q, k, v]))


@pytest.mark.parametrize("transform", ["qkv", "gate_up"])
def test_split_inverts_fuse(transform):
    cfg = load_config(None, ["model.preset=r1-distill-qwen-1.5b"]).model
    h, hd = 16, cfg.head_dim
    if transform == "qkv":
        parts = [torch.randn(12 * hd, h), torch.randn(2 * hd, h), torch.randn(2 * hd, h)]
    else:
        parts = [torch.randn(40, h), torch.randn(40, h)]
    row = Row("x", ("a", "b", "c")[: len(parts)], transform)
    assert all(torch.equal(a, b) for a, b in zip(split(row, fuse(row, parts, cfg), cfg), parts))


def test_name_map_covers_exactly_the_hf_tensors(hf_dir):
    cfg = load_config(None, [f"model.hf_path={hf_dir}"]).model
    hf_names = {n for row in name_map(cfg) for n in row.hf}
    assert hf_names == HFWeights(hf_dir).names()
    megatron = MegatronFromHF(HFWeights(hf_dir), cfg)
    fc1 = megatron["decoder.layers.1.mlp.linear_fc1.weight"]
    assert fc1.shape == (2 * cfg.ffn_hidden_size, cfg.hidden_size)
    back = dict(hf_tensors([(name, megatron[name]) for name in megatron], cfg))
    weights = HFWeights(hf_dir)
    assert back.keys() == weights.names() and all(torch.equal(back[n], weights.get(n)) for n in back)
    te_name = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    assert torch.equal(megatron[te_name], weights.get("model.layers.0.input_layernorm.weight"))


def test_hf_path_fills_the_model_config(hf_dir):
    family = json.loads((hf_dir / "config.json").read_text())["model_type"]
    cfg = load_config(None, ["model.preset=qwen2-tiny", f"model.hf_path={hf_dir}"]).model
    assert ((cfg.family, cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.num_query_groups)
            == (family, 64, 4, 512, 2))
    assert cfg.add_qkv_bias == (family == "qwen2")


def test_missing_and_mismatched_weights_are_listed(tmp_path):
    hf_dir = make_hf_model("qwen2", tmp_path / "q")
    cfg = load_config(None, [f"model.hf_path={hf_dir}"]).model
    wrong = load_config(None, [f"model.hf_path={hf_dir}", "model.num_layers=6", "model.ffn_hidden_size=128"]).model
    with pytest.raises(ConversionError) as info:
        check_model_matches_hf(wrong, hf_dir)
    assert "num_layers: config 6" in str(info.value) and "ffn_hidden_size: config 128" in str(info.value)
    with pytest.raises(ConversionError, match="lacks tensors the model needs: model.layers.4.input_layernorm.weight"):
        MegatronFromHF(HFWeights(hf_dir), wrong)
    llama_like = load_config(None, [f"model.hf_path={hf_dir}", "model.add_qkv_bias=false"]).model
    with pytest.raises(ConversionError, match="tensors this model config does not use.*q_proj.bias"):
        MegatronFromHF(HFWeights(hf_dir), llama_like)
    with pytest.raises(ConversionError, match="has no model.safetensors"):
        HFWeights(tmp_path)
    del cfg


def test_unsupported_hf_configs_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        load_config(None, [f"model.hf_path={tmp_path}"])
    scaled = make_hf_model("llama", tmp_path / "l", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="rope_(scaling|parameters)=.*llama3.*scaled RoPE is not implemented"):
        load_config(None, [f"model.hf_path={scaled}"])
    with pytest.raises(ConfigError, match="config.json does not exist"):
        load_config(None, [f"model.hf_path={tmp_path / 'nowhere'}"])


@pytest.mark.parametrize("family, theta", [("llama", 123456.0), ("qwen2", 2500.0)])
def test_rope_theta_is_read_from_either_config_layout(tmp_path, family, theta):
    """transformers 5 saves the RoPE base inside rope_parameters, 4.x as top-level rope_theta; both
    layouts, and the file this transformers writes, give the same rotary_base (not the 10000 default)."""
    from remix_megatron.config.presets import model_values_from_hf_config

    saved = make_hf_model(family, tmp_path / family, rope_theta=theta)
    assert load_config(None, [f"model.hf_path={saved}"]).model.rotary_base == theta
    hf = json.loads((saved / "config.json").read_text())
    hf.pop("rope_theta", None)
    hf.pop("rope_parameters", None)
    v4 = model_values_from_hf_config({**hf, "rope_theta": theta, "rope_scaling": None})
    v5 = model_values_from_hf_config({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": theta}})
    assert v4["rotary_base"] == v5["rotary_base"] == theta
    assert model_values_from_hf_config(hf)["rotary_base"] == 10000.0  # transformers' default when neither is set
    with pytest.raises(ConfigError, match="rope_parameters=.*yarn.*scaled RoPE is not implemented"):
        model_values_from_hf_config({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": theta, "factor": 4}})


def test_exported_config_gives_transformers_the_model_rope_theta(tmp_path):
    """The export starts from the source's config.json: an inherited rope_parameters must carry the
    model's RoPE base (transformers 5 prefers it over a top-level rope_theta), and 4.x reads rope_theta."""
    from transformers import AutoConfig

    from remix_megatron.convert.hf import hf_config_from_model

    model = load_config(None, ["model.preset=llama-tiny", "model.rotary_base=77777.0"]).model
    base = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "rope_scaling": None, "rope_theta": 500000.0}
    config = hf_config_from_model(model, critic=False, dtype=torch.float32, base=base)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 77777.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(tmp_path)
    parameters = getattr(loaded, "rope_parameters", None) or {"rope_theta": loaded.rope_theta}
    assert parameters["rope_theta"] == 77777.0
