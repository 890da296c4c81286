"""Evaluation arithmetic on hand-made generations: pass@1, avg@k, pass@k, format, self-reflection,
the paper's protocols, and the outputs (parquet rows, JSON summary, table)."""

from __future__ import annotations

import itertools
import json
from math import comb

import numpy as np
import pyarrow.parquet as pq
import pytest

from remix_megatron.evaluation import (
    Protocol,
    avg_at_k,
    format_correct,
    pass_at_k,
    prompt_opens_think,
    resolve_benchmarks,
    self_reflection,
)
from remix_megatron.evaluation.runner import EvalSettings, evaluate_benchmarks, write_outputs
from remix_megatron.rewards import MathGrader
from remix_megatron.rollout import Generation

pytestmark = pytest.mark.unit


class CharTokenizer:
    """One token per character (ord), eos = 0; enough for PromptSource and decoding."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0 or not skip_special_tokens)


class ScriptedEngine:
    """Answers each prompt (by its text) with scripted responses, cycling when n exceeds the script."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []

    def generate(self, prompts, params):
        self.calls.append(params)
        out = []
        for index, prompt in enumerate(prompts):
            answers = self.script["".join(chr(t) for t in prompt)]
            out.append([Generation(prompt_index=index, token_ids=np.array([ord(c) for c in answers[s % len(answers)]]
                                                                         + [0], np.int32), finish_reason="stop")
                        for s in range(params.n)])
        return out


def test_format_correctness_needs_one_paired_think():
    assert format_correct("<think>reason</think> \\boxed{3}")
    assert not format_correct("no tags \\boxed{3}")
    assert not format_correct("</think><think> reversed")
    assert not format_correct("<think>a</think><think>b</think>")  # two blocks
    assert not format_correct("<think>never closed")
    assert format_correct("reason</think> \\boxed{3}", opened=True)  # R1 templates open <think> in the prompt
    assert not format_correct("<think>again</think>", opened=True)
    assert prompt_opens_think("<|Assistant|><think>\n") and not prompt_opens_think("<|Assistant|>")
    assert not prompt_opens_think("<think>a</think> then")


def test_self_reflection_matches_whole_words_only():
    assert self_reflection("Wait, that is wrong.") and self_reflection("Let me re-examine step 2")
    assert self_reflection("I CHECK it") and self_reflection("small, but positive")
    assert not self_reflection("butter and attribute")  # 'but' inside words does not count
    assert not self_reflection("checked? no: checks and waiting")  # inflections are other words
    assert not self_reflection("")


def test_pass_at_k_matches_enumeration():
    for n, c in [(5, 0), (5, 2), (6, 3), (4, 4)]:
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            expected = sum(any(s) for s in subsets) / len(subsets)  # share of k-subsets with a correct one
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
            assert expected == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_avg_at_k_is_the_mean_share_per_problem():
    # problem shares 3/4, 0/4, 1/4 -> (0.75 + 0 + 0.25) / 3
    assert avg_at_k([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]) == pytest.approx(1 / 3)
    assert avg_at_k([[True], [False]]) == 0.5  # k = 1 is pass@1
    with pytest.raises(ValueError):
        avg_at_k([])


def test_paper_protocols_and_spec_errors(tmp_path):
    for name in ("aime24", "amc23", "math500", "minerva", "olympiadbench"):
        (tmp_path / f"{name}.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    (tmp_path / "mine.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    found = {b.name: b.protocol for b in resolve_benchmarks("aime24,amc23,math500,minerva,olympiadbench", tmp_path)}
    assert found["aime24"] == found["amc23"] == Protocol(samples=32, temperature=0.1)
    assert found["math500"] == found["minerva"] == found["olympiadbench"] == Protocol()
    assert found["aime24"].metric == "avg@32" and found["math500"].metric == "pass@1"
    custom = resolve_benchmarks([f"x={tmp_path / 'mine.jsonl'}", str(tmp_path / "mine.jsonl")], tmp_path, samples=4,
                                temperature=0.6)
    assert [(b.name, b.protocol.samples, b.protocol.temperature) for b in custom] == [("x", 4, 0.6), ("mine", 4, 0.6)]
    with pytest.raises(ValueError, match="unknown benchmark"):
        resolve_benchmarks("gsm8k", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_benchmarks("aime24", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="greedy samples"):
        resolve_benchmarks("math500", tmp_path, samples=8)  # greedy math500 x 8 would be 8 copies
    with pytest.raises(ValueError, match="twice"):
        resolve_benchmarks("math500,math500", tmp_path)


def _benchmark_files(tmp_path):
    greedy = tmp_path / "greedy.jsonl"
    greedy.write_text("".join(json.dumps({"id": f"g{i}", "problem": f"p{i}", "answer": str(i)}) + "\n"
                              for i in range(4)))
    sampled = tmp_path / "sampled.jsonl"
    sampled.write_text("".join(json.dumps({"id": f"s{i}", "problem": f"q{i}", "answer": "7"}) + "\n" for i in range(2)))
    return greedy, sampled


def test_scores_of_scripted_generations(tmp_path):
    greedy, sampled = _benchmark_files(tmp_path)
    ok, wrong = "<think>so</think> \\boxed{%s}", "Wait, \\boxed{-1}"
    script = {"p0": [ok % 0], "p1": [ok % 1], "p2": [wrong], "p3": ["<think>cut off"],  # 2 of 4 right
              "q0": [ok % 7, wrong, ok % 7, ok % 7], "q1": [wrong, wrong, wrong, ok % 7]}  # 3/4 and 1/4
    benchmarks = resolve_benchmarks([f"greedy={greedy}", f"sampled={sampled}"], tmp_path)
    benchmarks[1] = type(benchmarks[1])(name="sampled", path=str(sampled),
                                        protocol=Protocol(samples=4, temperature=1.0))
    engine = ScriptedEngine(script)
    result = evaluate_benchmarks(engine, CharTokenizer(), MathGrader(timeout_s=2.0), benchmarks,
                                 EvalSettings(template="{problem}", max_new_tokens=64, seed=3))
    g, s = result.scores
    assert (g.metric, g.score, g.problems, g.samples_per_problem) == ("pass@1", 0.5, 4, 1)
    assert g.format_rate == 0.5 and g.self_reflection_rate == 0.25  # p0, p1 paired; p2 says "Wait"
    assert (s.metric, s.score, s.problems) == ("avg@4", pytest.approx(0.5), 2)  # (3/4 + 1/4) / 2
    assert s.pass_at_k == 1.0 and s.self_reflection_rate == 0.5  # 4 of 8 responses are the "Wait" one
    assert result.average == pytest.approx(0.5)
    assert [(p.n, p.temperature, p.seed) for p in engine.calls] == [(1, 0.0, 3), (4, 1.0, 3)]
    lengths = [r["response_length"] for r in result.rows[:4]]
    assert lengths == [len(script[f"p{i}"][0]) + 1 for i in range(4)]  # + the stop token
    paths = write_outputs(result, tmp_path / "out")
    table = pq.read_table(paths["generations"]).to_pylist()
    assert len(table) == 4 + 8 and table[0]["problem_id"] == "g0" and table[0]["correct"] is True
    assert [r["sample"] for r in table if r["problem_id"] == "s1"] == [0, 1, 2, 3]
    assert [r["correct"] for r in table if r["problem_id"] == "s1"] == [False, False, False, True]
    summary = json.loads(paths["summary"].read_text())
    assert summary["benchmarks"]["sampled"]["score"] == pytest.approx(0.5) and summary["average"] == pytest.approx(0.5)
    assert "| score | 50.00 (pass@1) | 50.00 (avg@4) | 50.00 |" in paths["table"].read_text()


def test_data_parallel_shares_cover_every_problem_once(tmp_path, monkeypatch):
    """Each of 3 DP ranks scores its own share (gather left out here); together they are the whole set."""
    from remix_megatron.evaluation import runner

    greedy, _ = _benchmark_files(tmp_path)
    script = {f"p{i}": [f"\\boxed{{{i if i % 2 else -1}}}"] for i in range(4)}
    benchmark = resolve_benchmarks([f"greedy={greedy}"], tmp_path)
    whole = evaluate_benchmarks(ScriptedEngine(script), CharTokenizer(), MathGrader(), benchmark,
                                EvalSettings(template="{problem}"))
    assert whole.scores[0].score == 0.5 and [r["problem_index"] for r in whole.rows] == [0, 1, 2, 3]
    monkeypatch.setattr(runner, "_gather", lambda rows, dp_size, dp_group: rows)
    shards = [evaluate_benchmarks(ScriptedEngine(script), CharTokenizer(), MathGrader(), benchmark,
                                  EvalSettings(template="{problem}"), dp_rank=r, dp_size=3).rows for r in range(3)]
    assert [[row["problem_id"] for row in shard] for shard in shards] == [["g0", "g3"], ["g1"], ["g2"]]
    merged = sorted((row for shard in shards for row in shard), key=lambda row: row["problem_index"])
    assert merged == whole.rows


def test_a_prompt_too_long_for_the_context_is_a_clear_error(tmp_path):
    greedy, _ = _benchmark_files(tmp_path)
    with pytest.raises(ValueError, match="no room to answer"):
        evaluate_benchmarks(ScriptedEngine({}), CharTokenizer(), MathGrader(),
                            resolve_benchmarks([f"greedy={greedy}"], tmp_path),
                            EvalSettings(template="{problem}", context_limit=2))


def test_limit_scores_and_reports_only_the_first_problems(tmp_path, caplog):
    """--limit 2 of a set whose later problems are overlong: nothing is reported dropped or truncated
    (the whole set was, before), and exactly the first 2 problems are scored."""
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"id": f"g{i}", "problem": f"p{i}" + "x" * (40 * (i >= 2)), "answer": str(i)})
                            + "\n" for i in range(4)))
    script = {"p0": ["\\boxed{0}"], "p1": ["\\boxed{5}"]}
    benchmark = resolve_benchmarks([f"set={path}"], tmp_path)
    with caplog.at_level("WARNING"):
        result = evaluate_benchmarks(ScriptedEngine(script), CharTokenizer(), MathGrader(), benchmark,
                                     EvalSettings(template="{problem}", max_prompt_tokens=8, limit=2))
    score = result.scores[0]
    assert (score.problems, score.score, score.dropped_prompts) == (2, 0.5, 0)
    assert "dropped" not in caplog.text
