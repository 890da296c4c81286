"""The tiny arithmetic model: built (or cached) as a user would, in the accuracy band, graded by
the real math grader through our own engine, and loaded into Megatron with transformers' logits."""

from __future__ import annotations

import json

import pytest

from remix_megatron.data import PromptSource, load_records
from remix_megatron.data.tiny import TEMPLATE, make_tokenizer, solution
from remix_megatron.rewards import MathGrader
from remix_megatron.rollout import SamplingParams
from remix_megatron.rollout.hf_engine import HFEngine
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_dir():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()  # cached after the first build on a machine


def test_format_pieces_survive_decoding():
    tokenizer = make_tokenizer()
    text = solution(47, 85)
    assert text == "<think>231</think> \\boxed{132}"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # not special tokens: never stripped
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces == ["<think>", "2", "3", "1", "</think>", " ", "\\boxed{", "1", "3", "2", "}"]  # 11 + eos
    assert tokenizer.convert_ids_to_tokens(tokenizer("<thin \\boxed")["input_ids"]) == list("<thin \\boxed")


def test_accuracy_band_through_engine_and_grader(tiny_dir):
    build = json.loads((tiny_dir / "BUILD.json").read_text())
    assert 0.10 <= build["heldout_accuracy"] <= 0.60, build
    assert 500_000 < build["parameters"] < 1_500_000
    from remix_megatron.data import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    evaluated = load_records(str(tiny_dir / "heldout.jsonl"))[: build["settings"]["eval_size"]]  # what SFT measured
    source = PromptSource(evaluated, tokenizer, template=TEMPLATE, max_prompt_tokens=32)
    engine = HFEngine(str(tiny_dir))
    generations = engine.generate([p.token_ids.tolist() for p in source.prompts],
                                  SamplingParams(temperature=0.0, max_new_tokens=40,
                                                 stop_token_ids=(tokenizer.eos_token_id,)))
    texts = [tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in generations]
    scores, stats = MathGrader()(texts, [p.answer for p in source.prompts])
    accuracy = sum(scores) / len(scores)
    assert abs(accuracy - build["heldout_accuracy"]) <= 0.03, (accuracy, build["heldout_accuracy"])
    assert stats.no_box < len(texts) // 2  # the format is learned even where the sum is wrong


def test_loads_into_megatron_with_transformers_logits(tiny_dir):
    out = run_cli(["convert", "verify-hf", "configs/tiny_cpu.yaml", f"model.hf_path={tiny_dir}",
                   "parallel.tensor_parallel=2", "parallel.pipeline_parallel=1"], nproc=2).stdout
    assert "OK" in out, out


def _safetensors_sha256(model_dir) -> str:
    """The weights' hash computed from the saved file, independently of BUILD.json's record."""
    import hashlib

    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        digest.update(name.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def test_build_does_not_depend_on_the_callers_kernels(tmp_path):
    """The kernels a CPU picks (ATen's vector width, MKL's code branch, threads) change the SFT's
    rounding, so unpinned two builds differ bitwise; the build pins them, so the weights are the same
    whatever the caller's environment. (That two different CPUs then agree is expected from the same
    portable kernels, not shown here: this test has one CPU.)"""
    import os
    import subprocess
    import sys
    from dataclasses import asdict

    from remix_megatron.data.tiny import TinySettings

    settings = asdict(TinySettings(max_steps=3, eval_every=10**6, target_accuracy=2.0))  # 3 steps, no eval
    callers = ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "2"},
               {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"})
    unpinned = ("import json, sys, torch; from transformers import Qwen2ForCausalLM\n"
                "from remix_megatron.data import tiny\n"
                "s = tiny.TinySettings(**json.loads(sys.argv[1])); torch.manual_seed(s.seed)\n"
                "m = Qwen2ForCausalLM(tiny._model_config(s, 64))\n"
                "tiny._train(s, m, tiny.make_tokenizer(), []); print(tiny.weights_sha256(m))")
    pinned = ("import json, sys; from remix_megatron.data import tiny\n"
              "tiny.build_tiny_model(sys.argv[2], tiny.TinySettings(**json.loads(sys.argv[1])))")
    unpinned_hashes, pinned_hashes = [], []
    for i, caller in enumerate(callers):
        env = {**os.environ, **caller}
        run = subprocess.run([sys.executable, "-c", unpinned, json.dumps(settings)], env=env, capture_output=True,
                             text=True, check=True)
        unpinned_hashes.append(run.stdout.split()[-1])
        out = tmp_path / f"build{i}"
        subprocess.run([sys.executable, "-c", pinned, json.dumps(settings), str(out)], env=env, check=True)
        build = json.loads((out / "BUILD.json").read_text())
        assert build["sft_steps"] == 3 and build["kernels"]["ATEN_CPU_CAPABILITY"] == "default"
        assert build["weights_sha256"] == _safetensors_sha256(out)
        pinned_hashes.append(build["weights_sha256"])
    assert unpinned_hashes[0] != unpinned_hashes[1], "the callers' kernels should round differently unpinned"
    assert pinned_hashes[0] == pinned_hashes[1]
