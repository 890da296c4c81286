"""benchmarks/engine_generation.py: the ~50M model is the size it claims, speaks the tiny task's tokens,
and the raw-copy baseline really copies."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import engine_generation as eg  # noqa: E402

pytestmark = pytest.mark.unit


def test_the_50m_model_has_the_hand_counted_parameters_and_the_tiny_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    from remix_megatron.config import load_config
    from remix_megatron.data.prompts import load_tokenizer
    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.planning import total_parameters

    tiny = build_tiny_model()
    out = eg.build_50m_model(tiny, tmp_path / "m50")
    h, layers, ffn, vocab, kv = 512, 16, 1536, 64, 2 * 64  # kv: 2 KV heads of head_dim 64
    per_layer = 2 * h + (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ffn  # norms, q, k, v (biased), o, MLP
    expected = 2 * vocab * h + h + layers * per_layer  # embedding, untied output layer, final norm
    assert expected == 48_329_216
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert total_parameters(load_config(None, ["model.preset=", f"model.hf_path={out}"]).model) == expected
    ours, theirs = load_tokenizer(str(out)), load_tokenizer(str(tiny))
    # the tiny model's vocabulary (64 rows, 36 tokens used) and special tokens
    assert model.config.vocab_size == 64 >= len(theirs) and model.config.eos_token_id == theirs.eos_token_id
    chat = [{"role": "user", "content": "15+56="}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, add_generation_prompt=True)


def test_raw_copier_copies_into_tensors_allocated_once():
    tensors = [("a", torch.arange(6.0).view(2, 3)), ("b", torch.ones(4))]
    first, copy = eg.raw_copier(tensors)
    copy()
    assert all(torch.equal(target, tensor) for target, (_, tensor) in zip(first, tensors))
    tensors[1][1].mul_(3)
    pointers = [target.data_ptr() for target in first]
    copy()
    assert torch.equal(first[1], torch.full((4,), 3.0)) and [t.data_ptr() for t in first] == pointers
