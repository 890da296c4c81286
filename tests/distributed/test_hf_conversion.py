"""HF -> Megatron -> HF on real Megatron-core over gloo: logits equal transformers' (1e-5),
round trips are exact at TP1, TP2, PP2, TP2xPP2, and the critic exports as a token classifier."""

from __future__ import annotations

import json

import pytest
import torch

from remix_megatron.convert.hf import HFWeights
from tests.conftest import run_cli
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}


def layout(tp: int, pp: int) -> list[str]:
    return [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_hf_model(family, root / family) for family in ("qwen2", "llama")}


@pytest.mark.parametrize("family,name", [("qwen2", "tp1"), ("qwen2", "tp2"), ("qwen2", "pp2"),
                                         ("qwen2", "tp2xpp2"), ("llama", "tp1"), ("llama", "tp2xpp2")])
def test_logits_match_transformers(hf_dirs, family, name):
    tp, pp = LAYOUTS[name]
    out = run_cli(["convert", "verify-hf", "configs/tiny_cpu.yaml", f"model.hf_path={hf_dirs[family]}",
                   *layout(tp, pp)], nproc=tp * pp).stdout
    assert "OK" in out, out
    diff = float(out.split("max |logit|) = ")[1].split()[0])
    assert diff < 1e-5


def read_all(hf_dir):
    weights = HFWeights(hf_dir)
    return {name: weights.get(name) for name in weights.names()}


@pytest.mark.parametrize("name", ["tp1", "tp2", "pp2", "tp2xpp2"])
def test_round_trip_is_exact(hf_dirs, tmp_path, name):
    """HF -> checkpoint at the layout -> HF from one process (resharded; and at TP2xPP2 from 4)."""
    tp, pp = LAYOUTS[name]
    source = hf_dirs["qwen2"]
    run = tmp_path / "run"
    run_cli(["convert", "from-hf", "configs/tiny_cpu.yaml", f"model.hf_path={source}", *layout(tp, pp),
             f"trainer.run_dir={run}"], nproc=tp * pp)
    original = read_all(source)
    exports = {"single_process": (1, [])}
    if name == "tp2xpp2":  # also export distributed, at the training layout
        exports["same_layout"] = (tp * pp, layout(tp, pp))
    for label, (nproc, overrides) in exports.items():
        out = tmp_path / label
        result = run_cli(["convert", "to-hf", str(run / "checkpoints"), *overrides, "--out", str(out)], nproc=nproc)
        assert "FutureWarning" not in result.stderr  # megatron's checkpoint load warned twice on every load
        exported = read_all(out)
        assert exported.keys() == original.keys(), label
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), f"{label}: {key}"
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_hidden_layers"] == 4


def test_exported_models_load_in_transformers(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    source = hf_dirs["llama"]
    run = tmp_path / "run"
    run_cli(["convert", "from-hf", "configs/tiny_cpu.yaml", f"model.hf_path={source}", *layout(2, 1),
             f"trainer.run_dir={run}"], nproc=2)
    for which in ("actor", "critic"):
        run_cli(["convert", "to-hf", str(run / "checkpoints"), "--model", which, "--out", str(tmp_path / which)])
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    original = AutoModelForCausalLM.from_pretrained(source)
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "actor")
    with torch.no_grad():
        torch.testing.assert_close(actor(tokens).logits, original(tokens).logits, rtol=0, atol=0)
    critic = AutoModelForTokenClassification.from_pretrained(tmp_path / "critic").eval()
    with torch.no_grad():
        values = critic(tokens).logits.squeeze(-1)
        hidden = original.model(tokens).last_hidden_state
    head = read_all(tmp_path / "critic")
    torch.testing.assert_close(values, hidden @ head["score.weight"].T.squeeze(-1) + head["score.bias"])
    assert values.shape == (2, 12) and values.abs().max() > 0  # the value head is not zero-initialised


def test_converting_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError, match="no complete checkpoint in"):
        run_cli(["convert", "to-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
