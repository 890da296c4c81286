"""Evaluation during training: the current actor on the configured benchmarks, on the engine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from remix_megatron.config import ExperimentConfig
from remix_megatron.console import say
from remix_megatron.evaluation.benchmarks import Benchmark
from remix_megatron.evaluation.runner import EvalSettings, evaluate_benchmarks, write_outputs
from remix_megatron.parallel import ParallelState


def evaluate_during_training(k: int, benchmarks: list[Benchmark], engine, sync: Callable[[], None], tokenizer,
                             grader, cfg: ExperimentConfig, state: ParallelState) -> dict[str, float]:
    """Score the current actor (``sync`` puts its weights into the awake engine) on the evaluation
    sets, split over DP ranks; each benchmark's generations are saved per evaluation."""
    start = time.perf_counter()
    say("event", f"evaluation at iteration {k} started: {', '.join(b.name for b in benchmarks)}",
        active=state.rank == 0)
    engine.wake_up()
    sync()
    metrics = {}
    for benchmark in benchmarks:
        heldout = benchmark.name == "heldout"
        settings = EvalSettings(template=cfg.data.template, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                                max_new_tokens=cfg.rollout.max_new_tokens, context_limit=cfg.trainer.seq_length + 1,
                                overlong=cfg.data.overlong,
                                limit=cfg.data.eval_size if heldout else cfg.data.eval_benchmark_size,
                                seed=cfg.trainer.seed + k, problem_key=cfg.data.problem_key,
                                answer_key=cfg.data.answer_key, id_key=cfg.data.id_key)
        result = evaluate_benchmarks(engine, tokenizer, grader, [benchmark], settings, dp_rank=state.dp_rank,
                                     dp_size=state.data_parallel, dp_group=state.dp_group)
        score = result.scores[0]
        if heldout:
            metrics["eval_accuracy"] = score.score
        else:
            metrics[f"eval/{score.benchmark}"] = score.score
        for key in ("format_rate", "self_reflection_rate", "mean_response_length"):
            metrics[f"eval/{score.benchmark}/{key}"] = getattr(score, key)
        if state.rank == 0 and not heldout:
            write_outputs(result, Path(cfg.trainer.run_dir) / "eval" / f"iter_{k:07d}" / score.benchmark)
    scored = [value for key, value in metrics.items() if key.count("/") == 1]
    if scored:
        metrics["eval/average"] = sum(scored) / len(scored)
    engine.sleep()
    say("event", f"evaluation at iteration {k} finished in {time.perf_counter() - start:.1f} s", active=state.rank == 0)
    return metrics
