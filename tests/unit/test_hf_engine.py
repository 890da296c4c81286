"""The transformers engine: sampling parameters, stop tokens, seeds, padding, log-probs, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remix_megatron.rollout import ENGINES, SamplingParams, get_engine_factory
from remix_megatron.rollout.hf_engine import HFEngine
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.unit
PROMPTS = [[5, 9, 11, 200], [7, 3], [42, 43, 44, 45, 46, 47]]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return make_hf_model("qwen2", root / "a", seed=0), make_hf_model("qwen2", root / "b", seed=1)


@pytest.fixture()
def engine(hf_dirs):
    return HFEngine(str(hf_dirs[0]))


def greedy_reference(model, prompt, steps):
    """Token-by-token argmax with full recomputation (no KV cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def teacher_forced_logprobs(model, prompt, response):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return np.array([logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(response)])


def test_greedy_matches_reference_despite_left_padding(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    for prompt, generations in zip(PROMPTS, out):
        assert len(generations) == 1 and generations[0].finish_reason == "length"
        assert generations[0].token_ids.tolist() == greedy_reference(engine.model, prompt, 6)


def test_logprobs_equal_a_teacher_forced_forward(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, seed=3))
    for prompt, (generation,) in zip(PROMPTS, out):
        expected = teacher_forced_logprobs(engine.model, prompt, generation.token_ids.tolist())
        np.testing.assert_allclose(generation.logprobs, expected, atol=2e-5)


def test_seed_determinism_and_n(engine):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=11)
    first, second = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [[g.token_ids.tolist() for g in gs] for gs in first] == [[g.token_ids.tolist() for g in gs] for gs in second]
    assert all(len(gs) == 3 and all(g.prompt_index == i for g in gs) for i, gs in enumerate(first))
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=12))
    assert [g.token_ids.tolist() for gs in other for g in gs] != [g.token_ids.tolist() for gs in first for g in gs]
    assert len({tuple(g.token_ids.tolist()) for g in first[0]}) > 1  # the n samples differ


def test_top_k_one_is_greedy(engine):
    sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=5, seed=0))
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert [g[0].token_ids.tolist() for g in sampled] == [g[0].token_ids.tolist() for g in greedy]


def test_stop_tokens_end_generation(engine):
    reference = greedy_reference(engine.model, PROMPTS[0], 6)
    stop = reference[2]
    (generation,), *_ = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6,
                                                                 stop_token_ids=(stop,)))
    cut = reference.index(stop) + 1
    assert generation.token_ids.tolist() == reference[:cut] and generation.finish_reason == "stop"
    assert len(generation.logprobs) == cut


def test_update_weights_sleep_and_wake(engine, hf_dirs):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(hf_dirs[1])
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.wake_up()
    engine.update_weights(other.named_parameters())
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert greedy[1][0].token_ids.tolist() == greedy_reference(other, PROMPTS[1], 5)
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="left .* parameters stale"):
        engine.update_weights([("model.norm.weight", torch.ones(64))])


def test_bad_input_and_registry(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    assert "hf" in ENGINES


def test_batch_size_splits_prompts_without_changing_greedy_results(hf_dirs):
    """``rollout.hf_batch_size`` reaches the engine; greedy output per prompt does not depend on
    how many prompts share a ``model.generate`` call (left padding is masked out)."""
    from types import SimpleNamespace

    from remix_megatron.config import RolloutConfig

    state = SimpleNamespace(runtime=SimpleNamespace(device=torch.device("cpu"), params_dtype=torch.float32))
    engine = get_engine_factory("hf")(RolloutConfig(hf_batch_size=2), None, state, str(hf_dirs[0]))
    assert engine.batch_size == 2
    calls = []
    original = engine._generate_batch
    engine._generate_batch = lambda prompts, params: calls.append(len(prompts)) or original(prompts, params)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    split = engine.generate(PROMPTS, params)
    assert calls == [2, 1]
    whole = HFEngine(str(hf_dirs[0]), batch_size=len(PROMPTS)).generate(PROMPTS, params)
    for prompt, (a,), (b,) in zip(PROMPTS, split, whole):
        assert a.token_ids.tolist() == b.token_ids.tolist() == greedy_reference(engine.model, prompt, 5)
