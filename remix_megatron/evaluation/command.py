"""``remix-megatron evaluate``: an HF directory or a training checkpoint on the math benchmarks.

- An HF directory goes straight into the engine.
- A checkpoint's actor is loaded into Megatron at the configured layout (one process by
  default, or TP/PP by override) and its weights are synced into an engine built from the
  checkpoint's base ``model.hf_path`` (architecture and tokenizer), the path a training run
  uses for its rollouts. No HF export is written.
Run under torchrun for data parallelism: every rank evaluates its share of each benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from remix_megatron.config import ConfigError, ExperimentConfig, load_config
from remix_megatron.config.schema import OVERLONG_POLICIES
from remix_megatron.evaluation.benchmarks import PAPER_BENCHMARKS, resolve_benchmarks

if TYPE_CHECKING:
    from remix_megatron.evaluation.runner import EvalResult, EvalSettings

#: a checkpoint is evaluated at TP1/PP1 (DP = world size) unless the command line overrides the layout
SINGLE_MODEL_LAYOUT = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.virtual_pipeline=1",
                       "parallel.use_distributed_optimizer=false"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a HuggingFace model directory")
    source.add_argument("--checkpoint", help="a training checkpoint root (its 'latest', or --iteration)")
    parser.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    parser.add_argument("--benchmarks", default=",".join(PAPER_BENCHMARKS),
                        help="comma-separated names (%(default)s), paths, or name=PATH")
    parser.add_argument("--data-dir", default="../shared/data", help="where <name>.jsonl of the named benchmarks lie")
    parser.add_argument("--out", required=True, help="output directory: generations.parquet, summary.json, table.md")
    parser.add_argument("--samples", type=int, default=0,
                        help="responses per problem for every benchmark (default: the paper's protocol, avg@32 at "
                             "T=0.1 for AIME/AMC, greedy pass@1 otherwise)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature for every benchmark")
    parser.add_argument("--limit", type=int, default=0, help="first N problems of each benchmark (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="response budget (default: rollout.max_new_tokens, 8192)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: rollout.max_prompt_tokens, 766")
    parser.add_argument("--template", default=None, help="prompt template with {problem} (default: data.template)")
    parser.add_argument("--overlong", choices=OVERLONG_POLICIES, default="drop",
                        help="prompts over the limit: drop them (counted) or keep their last tokens")
    parser.add_argument("--engine", default=None,
                        help="generation engine: hf | vllm | sglang (default: rollout.engine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor_parallel=2")


def _config(args: argparse.Namespace) -> ExperimentConfig:
    extra = [f"rollout.engine={args.engine}"] if args.engine else []
    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            raise ConfigError(f"--model {args.model} is not a HuggingFace model directory (no config.json)")
        return load_config(None, [f"model.hf_path={args.model}", *extra, *args.overrides])
    from remix_megatron.checkpoint import checkpoint_dir

    directory = checkpoint_dir(args.checkpoint, args.iteration)
    cfg = load_config(directory / "config.yaml", [*SINGLE_MODEL_LAYOUT, *extra, *args.overrides])
    if not cfg.model.hf_path or not (Path(cfg.model.hf_path) / "config.json").is_file():
        raise ConfigError(f"{directory} was trained from model.hf_path={cfg.model.hf_path!r}, which is not an HF "
                          "directory here; pass model.hf_path=DIR (the base model: its tokenizer and architecture)")
    return cfg


def _settings(args: argparse.Namespace, cfg: ExperimentConfig) -> "EvalSettings":
    from remix_megatron.evaluation.runner import EvalSettings

    return EvalSettings(template=args.template or cfg.data.template,
                        max_prompt_tokens=args.max_prompt_tokens or cfg.rollout.max_prompt_tokens,
                        max_new_tokens=args.max_new_tokens or cfg.rollout.max_new_tokens,
                        context_limit=cfg.model.max_position_embeddings, overlong=args.overlong, limit=args.limit,
                        seed=args.seed, problem_key=cfg.data.problem_key, answer_key=cfg.data.answer_key,
                        id_key=cfg.data.id_key)


def run(args: argparse.Namespace) -> "EvalResult":
    """Evaluate and write the outputs (rank 0); returns the result on every rank."""
    import torch.distributed as dist

    from remix_megatron.data import load_tokenizer
    from remix_megatron.evaluation.runner import evaluate_benchmarks, write_outputs
    from remix_megatron.parallel import destroy_parallel, init_parallel
    from remix_megatron.rewards import REWARDS
    from remix_megatron.rollout import get_engine_factory

    cfg = _config(args)
    benchmarks = resolve_benchmarks(args.benchmarks, args.data_dir, samples=args.samples, temperature=args.temperature)
    settings = _settings(args, cfg)
    state = init_parallel(cfg)
    try:
        tokenizer = load_tokenizer(cfg.model.hf_path)
        engine = get_engine_factory(cfg.rollout.engine)(cfg.rollout, cfg.model, state, cfg.model.hf_path,
                                                         seed=args.seed)
        what = args.model
        if args.checkpoint:
            what = _load_checkpoint_into(engine, args.checkpoint, args.iteration, cfg, state)
        if state.rank == 0:
            print(f"evaluating {what} on {', '.join(b.name for b in benchmarks)} with {cfg.rollout.engine} on "
                  f"{state.data_parallel} data-parallel rank(s)", flush=True)
        result = evaluate_benchmarks(engine, tokenizer, REWARDS.get(cfg.data.reward)(), benchmarks, settings,
                                     dp_rank=state.dp_rank, dp_size=state.data_parallel, dp_group=state.dp_group,
                                     progress=True)
        engine.shutdown()
        result.settings = {"source": str(what), "engine": cfg.rollout.engine, "data_parallel": state.data_parallel,
                           **{k: v for k, v in vars(settings).items()},
                           "protocols": {b.name: vars(b.protocol) for b in benchmarks}}
        if state.rank == 0:
            paths = write_outputs(result, args.out)
            print(result.table(), flush=True)
            print(f"generations: {paths['generations']}\nsummary: {paths['summary']}", flush=True)
        dist.barrier()
        return result
    finally:
        destroy_parallel()


def _load_checkpoint_into(engine, root: str, iteration: int | None, cfg: ExperimentConfig, state) -> str:
    from remix_megatron.checkpoint import checkpoint_dir, load_checkpoint, read_trainer_state
    from remix_megatron.models import build_actor
    from remix_megatron.rollout.weight_sync import sync_weights

    directory = checkpoint_dir(root, iteration)
    actor = build_actor(cfg.model, state)
    payload = load_checkpoint(root, {"actor": actor}, state, iteration=read_trainer_state(directory)["iteration"],
                              load_optimizer=False)
    sync_weights(engine, actor, state, cfg.model, bucket_bytes=cfg.rollout.weight_sync_bucket_mb << 20)
    del actor
    return f"{directory} (iteration {payload['iteration']})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
