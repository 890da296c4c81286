"""Generate, grade and score benchmarks with any generation engine, data-parallel over ranks.

Each data-parallel rank takes every ``dp_size``-th problem of each benchmark, generates the
protocol's samples for them in one engine call, grades them (the math reward, on that rank),
and the rows are gathered on every rank. The result does not depend on the DP size for greedy
protocols; sampled ones are reproducible for a given (seed, DP size, engine).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from remix_megatron.data import PromptSource, load_records
from remix_megatron.evaluation.benchmarks import Benchmark
from remix_megatron.evaluation.metrics import (
    avg_at_k,
    format_correct,
    pass_at_k,
    prompt_opens_think,
    self_reflection,
)
from remix_megatron.fileio import atomic_write_text
from remix_megatron.rollout.engine import SamplingParams

ROW_FIELDS = ("benchmark", "problem_index", "problem_id", "problem", "answer", "sample", "response", "correct",
              "response_length", "finish_reason", "format_correct", "self_reflection")


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    template: str  # the prompt template ({problem})
    max_prompt_tokens: int = 766
    max_new_tokens: int = 8192
    context_limit: int = 0  # prompt + response tokens the model can take; 0 = no limit beyond max_new_tokens
    overlong: str = "drop"  # prompts over max_prompt_tokens: drop | truncate
    limit: int = 0  # first N problems of each benchmark (before dropping overlong ones); 0 = all
    seed: int = 0
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str = "id"


@dataclass
class BenchmarkScore:
    benchmark: str
    metric: str  # pass@1 | avg@k
    score: float  # fraction in [0, 1]
    problems: int
    samples_per_problem: int
    temperature: float
    pass_at_k: float | None  # with k = samples_per_problem, when > 1
    format_rate: float
    self_reflection_rate: float
    mean_response_length: float
    truncated_rate: float
    dropped_prompts: int
    seconds: float


@dataclass
class EvalResult:
    rows: list[dict]
    scores: list[BenchmarkScore]
    settings: dict = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(s.score for s in self.scores) / len(self.scores)

    def summary(self) -> dict:
        return {"benchmarks": {s.benchmark: asdict(s) for s in self.scores}, "average": self.average,
                "settings": self.settings}

    def table(self) -> str:
        """A markdown table like the paper's: one column per benchmark plus the average (percent)."""
        head = "| " + " | ".join(["metric", *(s.benchmark for s in self.scores), "avg"]) + " |"
        rule = "|" + "---|" * (len(self.scores) + 2)
        score = "| score | " + " | ".join(f"{100 * s.score:.2f} ({s.metric})" for s in self.scores) + \
            f" | {100 * self.average:.2f} |"
        lines = [head, rule, score]
        for label, key, scale in (("format %", "format_rate", 100), ("self-reflection %", "self_reflection_rate", 100),
                                  ("response length", "mean_response_length", 1), ("problems", "problems", 1)):
            values = [scale * getattr(s, key) for s in self.scores]
            lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" if key != "problems" else str(int(v))
                                                       for v in values) + " | |")
        return "\n".join(lines)


def _gather(rows: list[dict], dp_size: int, dp_group) -> list[dict]:
    if dp_size == 1:
        return rows
    import torch.distributed as dist

    parts: list = [None] * dp_size
    dist.all_gather_object(parts, rows, group=dp_group)
    return [row for part in parts for row in part]


def _score(benchmark: Benchmark, rows: list[dict], dropped: int, seconds: float) -> BenchmarkScore:
    by_problem: dict[int, list[dict]] = {}
    for row in rows:
        by_problem.setdefault(row["problem_index"], []).append(row)
    k = benchmark.protocol.samples
    groups = [[r["correct"] for r in group] for group in by_problem.values()]
    count = max(len(rows), 1)
    return BenchmarkScore(
        benchmark=benchmark.name, metric=benchmark.protocol.metric, score=avg_at_k(groups), problems=len(by_problem),
        samples_per_problem=k, temperature=benchmark.protocol.temperature,
        pass_at_k=sum(pass_at_k(len(g), sum(g), k) for g in groups) / len(groups) if k > 1 else None,
        format_rate=sum(r["format_correct"] for r in rows) / count,
        self_reflection_rate=sum(r["self_reflection"] for r in rows) / count,
        mean_response_length=sum(r["response_length"] for r in rows) / count,
        truncated_rate=sum(r["finish_reason"] == "length" for r in rows) / count, dropped_prompts=dropped,
        seconds=round(seconds, 3))


def evaluate_benchmarks(engine, tokenizer, grader, benchmarks: Sequence[Benchmark], settings: EvalSettings, *,
                        dp_rank: int = 0, dp_size: int = 1, dp_group=None, progress: bool = False) -> EvalResult:
    """Score ``benchmarks`` with ``engine`` (awake, holding the weights to evaluate)."""
    rows_all: list[dict] = []
    scores = []
    for benchmark in benchmarks:
        start = time.perf_counter()
        # the first ``limit`` problems only: the rest is neither tokenized nor counted as dropped / truncated
        source = PromptSource(load_records(benchmark.path)[: settings.limit or None], tokenizer,
                              template=settings.template,
                              max_prompt_tokens=settings.max_prompt_tokens, overlong=settings.overlong,
                              problem_key=settings.problem_key, answer_key=settings.answer_key,
                              id_key=settings.id_key, name=benchmark.name)
        mine = source.prompts[dp_rank::dp_size]
        rows: list[dict] = []
        if mine:
            budget = settings.max_new_tokens
            if settings.context_limit:
                budget = min(budget, settings.context_limit - max(len(p.token_ids) for p in mine))
                if budget < 1:
                    raise ValueError(f"{benchmark.name}: prompts of up to {max(len(p.token_ids) for p in mine)} tokens "
                                     f"leave no room to answer in a context of {settings.context_limit}")
            protocol = benchmark.protocol
            params = SamplingParams(n=protocol.samples, temperature=protocol.temperature, top_p=protocol.top_p,
                                    max_new_tokens=budget, stop_token_ids=(tokenizer.eos_token_id,),
                                    seed=settings.seed + dp_rank, return_logprobs=False)
            generations = engine.generate([p.token_ids.tolist() for p in mine], params)
            opened = [prompt_opens_think(tokenizer.decode(p.token_ids.tolist(), skip_special_tokens=False))
                      for p in mine]
            flat = [(i, s, g) for i, group in enumerate(generations) for s, g in enumerate(group)]
            texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for _, _, g in flat]
            grades, _ = grader(texts, [mine[i].answer for i, _, _ in flat])
            for (i, s, g), text, grade in zip(flat, texts, grades):
                rows.append({"benchmark": benchmark.name, "problem_index": dp_rank + i * dp_size,
                             "problem_id": mine[i].id, "problem": mine[i].problem, "answer": mine[i].answer,
                             "sample": s, "response": text, "correct": grade > 0,
                             "response_length": int(len(g.token_ids)), "finish_reason": g.finish_reason,
                             "format_correct": format_correct(text, opened=opened[i]),
                             "self_reflection": self_reflection(text)})
        rows = _gather(rows, dp_size, dp_group)
        rows.sort(key=lambda r: (r["problem_index"], r["sample"]))
        scores.append(_score(benchmark, rows, source.dropped, time.perf_counter() - start))
        rows_all += rows
        if progress and dp_rank == 0:
            last = scores[-1]
            print(f"{benchmark.name}: {last.metric} {100 * last.score:.2f} on {last.problems} problems "
                  f"({len(rows)} responses, {last.seconds:.1f} s)", flush=True)
    return EvalResult(rows=rows_all, scores=scores)


def write_outputs(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """generations.parquet (every response, graded), summary.json and table.md under ``out_dir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = {name: [row[name] for row in result.rows] for name in ROW_FIELDS}
    table = pa.table(columns, schema=pa.schema([
        ("benchmark", pa.string()), ("problem_index", pa.int32()), ("problem_id", pa.string()),
        ("problem", pa.string()), ("answer", pa.string()),
        ("sample", pa.int32()), ("response", pa.string()), ("correct", pa.bool_()), ("response_length", pa.int32()),
        ("finish_reason", pa.string()), ("format_correct", pa.bool_()), ("self_reflection", pa.bool_())]))
    paths = {"generations": out / "generations.parquet", "summary": out / "summary.json", "table": out / "table.md"}
    tmp = paths["generations"].with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(paths["generations"])
    atomic_write_text(paths["summary"], json.dumps(result.summary(), indent=1))
    atomic_write_text(paths["table"], result.table() + "\n")
    return paths
