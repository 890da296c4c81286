"""Small user-facing fixes: store prune needs --keep-last, --version, the metrics glossary, the HF
export's dtype and model card, and the tiny tokenizer's inputs."""

from __future__ import annotations

import json

import pytest
import torch

from remix_megatron import __version__
from remix_megatron.cli import main
from remix_megatron.config import load_config
from remix_megatron.glossary import GLOSSARY, entry, format_glossary
from tests.conftest import REPO
from tests.unit.store.test_sampler import build_store

pytestmark = pytest.mark.unit


def test_prune_without_keep_last_is_an_error(tmp_path, capsys):
    store = build_store(tmp_path / "s", iterations=range(3), groups=2)
    assert main(["store", "prune", str(tmp_path / "s")]) == 2
    assert "store prune needs --keep-last N" in capsys.readouterr().err
    assert store.iterations() == [0, 1, 2]  # nothing removed (it used to keep 2 silently or do nothing)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"remix-megatron {__version__}"


def test_glossary_patterns_and_check(tmp_path, capsys):
    assert entry("actor/ratio_mean/age12") == "actor/ratio_mean/age{a}" and entry("eval/math500") == "eval/{name}"
    assert entry("eval/heldout/format_rate") == "eval/{name}/format_rate" and entry("actor/ratio_mean") == \
        "actor/ratio_mean"
    assert entry("actor/ratio_mean/agex") is None and entry("made/up") is None
    assert len(format_glossary().splitlines()) == len(GLOSSARY)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "reward_mean": 0.5, "made/up": 1}) + "\n")
    assert main(["metrics", "--check", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == ["not in the glossary: made/up",
                                                    f"3 keys in {tmp_path}/metrics.jsonl, 1 without a glossary entry"]


def test_bf16_export_config_names_one_dtype():
    """A source config.json written by transformers >= 4.56 carries "dtype": "float32"; the export's must
    say bfloat16 there too, or from_pretrained(dtype="auto") loads float32."""
    from remix_megatron.convert.hf import hf_config_from_model

    model = load_config(REPO / "configs" / "tiny_remix_ppo.yaml").model
    config = hf_config_from_model(model, critic=False, dtype=torch.bfloat16, base={"dtype": "float32"})
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"


def test_model_card_says_the_chat_template_is_needed(tmp_path):
    from remix_megatron.convert.model_card import model_card

    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    card = model_card(tmp_path, critic=False, architecture="Qwen2ForCausalLM", dtype="bfloat16", source="/src")
    assert "chat template" in card and "apply_chat_template" in card and "is included" in card
    (tmp_path / "chat_template.jinja").unlink()
    assert "No chat template came with the source tokenizer" in model_card(
        tmp_path, critic=False, architecture="Qwen2ForCausalLM", dtype="float32", source=None)


def test_tiny_tokenizer_gives_what_generate_takes():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from remix_megatron.data.tiny import make_tokenizer

    tok = make_tokenizer()
    inputs = tok("12+34=", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}  # token_type_ids made model.generate(**inputs) fail
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 2)


def test_checkpoint_and_store_errors_are_one_line(monkeypatch, capsys):
    """A train/convert/evaluate run that stops on a named checkpoint or store error prints that
    line, not a traceback; any other exception still propagates with its traceback."""
    import argparse

    from remix_megatron import cli
    from remix_megatron.checkpoint import CheckpointError
    from remix_megatron.store import StoreError

    for error, shown in ((CheckpointError("ckpt/iter_0000002/.metadata: refused class os.system"),
                          "error: CheckpointError: ckpt/iter_0000002/.metadata: refused class os.system"),
                         (StoreError("store/INDEX.json lists iteration 1"),
                          "error: StoreError: store/INDEX.json lists iteration 1")):
        def fail(args, error=error):
            raise error
        monkeypatch.setattr(cli, "parse_args", lambda argv: argparse.Namespace(func=fail))
        assert main(["train"]) == 1
        assert capsys.readouterr().err.strip() == shown
    monkeypatch.setattr(cli, "parse_args", lambda argv: argparse.Namespace(func=lambda args: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        main(["train"])
