"""Command-line entry points: ``remix-megatron <command>`` (or ``python -m remix_megatron.cli``).

Multi-process commands are started by a launcher (torchrun, see launch/); every rank runs
the same command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from remix_megatron import __version__
from remix_megatron.config import MODEL_PRESETS, ConfigError, load_config, reference_yaml, save_config, to_yaml
from remix_megatron.evaluation import command as evaluation_command


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_parallel=2 (anywhere "
                                                     "among the options)")


def _positive_int(text: str) -> int:
    """argparse type of --world-size and --keep-last: a positive count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _print_checked(checked) -> None:
    for warning in checked.warnings:
        print(f"warning: {warning}")


def _cmd_smoke(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from remix_megatron.parallel import destroy_parallel
    from remix_megatron.smoke import run_smoke

    summary = run_smoke(cfg, dump_dir=args.dump, init_from=args.init_from)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        from pathlib import Path

        path = save_config(cfg, Path(cfg.trainer.run_dir) / "config.yaml",
                           header={"layout": summary["layout"], "device": summary["device"],
                                   "dtype": summary["dtype"], "backend": summary["backend"]})
        print(f"resolved config written to {path}", flush=True)
    destroy_parallel()
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from pathlib import Path

    import torch.distributed as dist

    from remix_megatron.parallel import destroy_parallel
    from remix_megatron.stopping import TrainingStopped
    from remix_megatron.trainer import train

    try:
        history = train(cfg)
    except TrainingStopped as stopped:  # a signal (preemption, time limit): exit as that signal would
        if dist.get_rank() == 0:
            print(stopped, file=sys.stderr, flush=True)
        # No rank exits before rank 0 has written its plots and said where the checkpoint is: torchrun
        # ends the other workers as soon as one exits non-zero.
        dist.barrier()
        destroy_parallel()
        return 128 + stopped.signum
    if dist.get_rank() == 0:
        path = save_config(cfg, Path(cfg.trainer.run_dir) / "config.yaml")
        accuracies = [r["eval_accuracy"] for r in history if "eval_accuracy" in r]
        if accuracies:
            print(f"held-out accuracy {accuracies[0]:.3f} -> {accuracies[-1]:.3f}; metrics in "
                  f"{Path(cfg.trainer.run_dir) / 'metrics.jsonl'}, config in {path}", flush=True)
    destroy_parallel()
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.action == "reference":
        sys.stdout.write(reference_yaml())
        return 0
    if args.config is None:
        raise ConfigError(f"'config {args.action}' needs a config file")
    cfg = load_config(args.config, args.overrides)
    if args.action == "check":
        from remix_megatron.validation import validate

        checked = validate(cfg, args.world_size)
        _print_checked(checked)
        print(f"OK: world size {checked.world_size} = TP{cfg.parallel.tensor_parallel} x "
              f"PP{cfg.parallel.pipeline_parallel} x DP{checked.data_parallel}")
        return 0
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_dryrun(args: argparse.Namespace) -> int:
    from remix_megatron.planning import format_layout, format_memory, plan_memory
    from remix_megatron.validation import training_problems, validate

    cfg = load_config(args.config, args.overrides)
    _print_checked(validate(cfg, args.world_size, training=False))
    for problem in training_problems(cfg):  # paths a launch may still supply (model.hf_path=... on the cluster)
        print(f"note: train will refuse this config as it stands: {problem}")
    plan = plan_memory(cfg, args.world_size, gpu_memory_gib=args.gpu_memory_gib)
    print(format_layout(plan.layout))
    print(format_memory(plan))
    return 0 if plan.fits else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from remix_megatron.sweep import run

    try:
        return run(args.sweep, args.overrides, slurm=args.slurm, dry_run=args.dry_run,
                   aggregate_only=args.aggregate_only)
    except RuntimeError as error:
        print(f"sweep error: {error}", file=sys.stderr)
        return 1


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in MODEL_PRESETS.names():
        preset = MODEL_PRESETS.get(name)
        print(f"{name:24s} {preset['family']:6s} layers={preset['num_layers']} hidden={preset['hidden_size']} "
              f"heads={preset['num_attention_heads']}/{preset['num_query_groups']} vocab={preset['vocab_size']}")
    return 0


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def _cmd_store(args: argparse.Namespace) -> int:
    from remix_megatron.store import StoreError, open_store

    try:
        store = open_store(args.root)
        if args.action == "inspect":
            print(f"{'iteration':>9} {'rows':>7} {'shards':>6} {'mean reward':>11} {'mean length':>11} {'on disk':>10}")
            total_rows = total_bytes = 0
            for iteration in store.iterations():
                info = store.info(iteration)
                total_rows, total_bytes = total_rows + info.rows, total_bytes + info.bytes
                print(f"{iteration:>9} {info.rows:>7} {len(info.shards):>6} {info.mean_reward:>11.4f} "
                      f"{info.mean_response_length:>11.1f} {_human_bytes(info.bytes):>10}")
            print(f"{'total':>9} {total_rows:>7} {'':>6} {'':>11} {'':>11} {_human_bytes(total_bytes):>10}")
            partial = sorted(p.name for p in store.root.glob("iter_*") if not store.is_published(int(p.name[5:])))
            if partial:
                print(f"unpublished (invisible, removed on the next writer open): {', '.join(partial)}")
            return 0
        if args.action == "verify":
            problems = store.verify()
            for problem in problems:
                print(f"PROBLEM: {problem}")
            print(f"{len(store.iterations())} iterations checked, {len(problems)} problems")
            return 1 if problems else 0
        if args.keep_last is None:
            raise ConfigError("store prune needs --keep-last N: the newest N iterations stay, older ones are deleted")
        removed = store.prune(args.keep_last)
        print(f"removed {len(removed)} iterations" + (f": {removed[0]}..{removed[-1]}" if removed else ""))
        return 0
    except StoreError as error:
        print(f"store error: {error}", file=sys.stderr)
        return 1


def _cmd_convert(args: argparse.Namespace) -> int:
    from remix_megatron.checkpoint import CheckpointError
    from remix_megatron.convert import commands

    try:
        if args.action == "from-hf":
            commands.from_hf(load_config(args.source, args.overrides))
            return 0
        if args.action == "verify-hf":
            return 0 if commands.verify_hf(load_config(args.source, args.overrides), tolerance=args.tolerance) else 1
        if args.out is None:
            raise ConfigError("to-hf needs --out DIR")
        commands.to_hf(args.source, args.out, which=args.model, iteration=args.iteration, dtype=args.dtype,
                       overrides=args.overrides)
        return 0
    except CheckpointError as error:
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from remix_megatron.checkpoint import CheckpointError
    from remix_megatron.evaluation.command import run

    try:
        run(args)
        return 0
    except (CheckpointError, ValueError) as error:  # ConfigError is a ValueError: keep its exit code
        if isinstance(error, ConfigError):
            raise
        print(f"evaluate error: {error}", file=sys.stderr)
        return 1


def _cmd_tiny(args: argparse.Namespace) -> int:
    import json
    import logging

    from remix_megatron.data.tiny import build_tiny_model, is_reference_build, tiny_model_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress goes to stderr
    cached = not args.force and (tiny_model_dir(args.out) / "BUILD.json").is_file()
    path = build_tiny_model(args.out, force=args.force)
    if args.path_only:
        print(path)
        return 0
    build = json.loads((path / "BUILD.json").read_text())
    how = f"found in the cache (built earlier in {build['build_s']} s)" if cached else f"built in {build['build_s']} s"
    print(f"tiny model: {path} ({build['parameters']} parameters, held-out accuracy "
          f"{build['heldout_accuracy']:.3f} after {build['sft_steps']} SFT steps, {how})")
    if is_reference_build(path):
        print(f"weights {build['weights_sha256'][:16]}: the reference build, the model of the README's numbers")
    else:
        print(f"weights {build.get('weights_sha256', 'unrecorded')[:16]}: not the reference build (other kernels: "
              "another CPU model, even another x86-64 one, or another BLAS or torch); the README's numbers "
              "describe a different model")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from remix_megatron.metrics_log import overlay_plots, read_history, run_names

    runs = [Path(run) for run in args.runs]
    histories = {name: read_history(run) for name, run in zip(run_names(runs) if len(runs) > 1 else [""], runs)}
    out = Path(args.out) if args.out else (runs[0] if len(runs) == 1 else Path("runs/overlay"))
    for path in overlay_plots(histories, out):
        print(f"plot: {path}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from remix_megatron.glossary import entry, format_glossary

    if not args.check:
        print(format_glossary())
        return 0
    from remix_megatron.metrics_log import read_history

    keys = sorted({key for record in read_history(args.check) for key in record})
    unknown = [key for key in keys if entry(key) is None]
    for key in unknown:
        print(f"not in the glossary: {key}")
    print(f"{len(keys)} keys in {args.check}/metrics.jsonl, {len(unknown)} without a glossary entry")
    return 1 if unknown else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remix-megatron", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help="the trainer's iterations on a synthetic batch (no generation) at the "
                                         "configured TP x PP x DP layout (run under torchrun for >1 process)")
    _add_config_args(smoke)
    smoke.add_argument("--dump", default=None, help="write forwards, gradients and parameters here (for tests)")
    smoke.add_argument("--init-from", default=None, help="full (TP=1, PP=1) actor/critic safetensors to start from "
                                                         "(a dump's init_stage*, merged)")
    smoke.set_defaults(func=_cmd_smoke)
    trainer = sub.add_parser("train",
                             help="ReMix / PPO / GRPO training from a YAML (run under torchrun for >1 process)")
    _add_config_args(trainer)
    trainer.set_defaults(func=_cmd_train)
    config = sub.add_parser("config", help="print the reference of all keys, show or check a config")
    config.add_argument("action", choices=("reference", "show", "check"))
    config.add_argument("config", nargs="?", default=None, help="experiment YAML (show, check)")
    config.add_argument("overrides", nargs="*", help="dotted overrides")
    config.add_argument("--world-size", type=_positive_int, default=None,
                        help="ranks to check the layout for (check; default: cluster.nodes x cluster.gpus_per_node, "
                             "else TP x PP)")
    config.set_defaults(func=_cmd_config)
    store = sub.add_parser("store", help="inspect, verify or prune a trajectory store")
    store.add_argument("action", choices=("inspect", "verify", "prune"))
    store.add_argument("root", help="the store directory")
    store.add_argument("--keep-last", type=_positive_int, default=None, metavar="N",
                       help="prune (required): the newest N iterations to keep")
    store.set_defaults(func=_cmd_store)
    convert = sub.add_parser("convert", help="HuggingFace <-> Megatron: from-hf CONFIG | to-hf CHECKPOINTS --out DIR "
                                             "| verify-hf CONFIG")
    convert.add_argument("action", choices=("from-hf", "to-hf", "verify-hf"))
    convert.add_argument("source", help="from-hf / verify-hf: experiment YAML (with model.hf_path); "
                                        "to-hf: a checkpoint root (trainer.checkpoint_dir)")
    convert.add_argument("overrides", nargs="*", help="dotted overrides (to-hf: e.g. a parallel layout)")
    convert.add_argument("--out", default=None, help="to-hf: output directory")
    convert.add_argument("--model", choices=("actor", "critic"), default="actor", help="to-hf: which model")
    convert.add_argument("--iteration", type=int, default=None, help="to-hf: checkpoint iteration (default latest)")
    convert.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="to-hf: dtype (default: training's)")
    convert.add_argument("--tolerance", type=float, default=1e-5, help="verify-hf: max logit difference")
    convert.set_defaults(func=_cmd_convert)
    evaluate = sub.add_parser("evaluate", help="pass@1 / avg@k of an HF directory or a checkpoint on the math "
                                               "benchmarks (run under torchrun for data parallelism)")
    evaluation_command.add_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)
    tiny = sub.add_parser("tiny", help="build (or find in the cache) the tiny arithmetic model for CPU runs")
    tiny.add_argument("--out", default=None, help="directory (default: the cache)")
    tiny.add_argument("--force", action="store_true", help="rebuild even if cached")
    tiny.add_argument("--path-only", action="store_true", help="print only the model directory (for scripts)")
    tiny.set_defaults(func=_cmd_tiny)
    dryrun = sub.add_parser("dryrun", help="check a config's layout and memory per GPU for a world size, without "
                                           "GPUs or processes (exit 1 when it does not fit)")
    _add_config_args(dryrun)
    dryrun.add_argument("--world-size", type=_positive_int, default=None,
                        help="ranks to plan for (default: cluster.nodes x cluster.gpus_per_node, else TP x PP)")
    dryrun.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="GPU memory to check against (default: cluster.gpu_memory_gib; 0 = no check)")
    dryrun.set_defaults(func=_cmd_dryrun)
    sweep = sub.add_parser("sweep", help="run a YAML grid over config keys (locally with torchrun, or as Slurm jobs) "
                                         "and aggregate the runs' metrics into a table and a plot")
    sweep.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides applied to every point")
    sweep.add_argument("--dry-run", action="store_true", help="validate every point and print the commands only")
    sweep.add_argument("--slurm", action="store_true", help="submit each point with sbatch launch/slurm.sbatch")
    sweep.add_argument("--aggregate-only", action="store_true", help="only write the table and plot of finished runs")
    sweep.set_defaults(func=_cmd_sweep)
    plot = sub.add_parser("plot", help="the run plots of RUN_DIR, or of several runs overlaid (finished or running)")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    plot.add_argument("--out", default=None, help="directory for the PNGs (default: the run directory; several runs: "
                                                  "runs/overlay)")
    plot.set_defaults(func=_cmd_plot)
    metrics = sub.add_parser("metrics", help="what every metrics.jsonl key means, one line each")
    metrics.add_argument("--check", default=None, metavar="RUN_DIR", help="list the keys of a run's metrics.jsonl "
                                                                          "that the glossary lacks (exit 1 if any)")
    metrics.set_defaults(func=_cmd_metrics)
    presets = sub.add_parser("presets", help="list model presets")
    presets.set_defaults(func=_cmd_presets)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; dotted overrides may come anywhere, also after options (``--world-size 4 a.b=1``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


# Errors whose message names the file and the fix: printed as one line, not a traceback. Their
# modules are heavy (torch) and imported only by the commands that raise them, so a class is
# looked up only when its module is loaded: an instance cannot exist otherwise.
ONE_LINE_ERRORS = (("remix_megatron.checkpoint", "CheckpointError"), ("remix_megatron.store.store", "StoreError"),
                   ("remix_megatron.rollout.weight_sync", "LogprobMismatchError"))


def _one_line_error(error: Exception) -> bool:
    return any(isinstance(error, getattr(sys.modules[module], name))
               for module, name in ONE_LINE_ERRORS if module in sys.modules)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not _one_line_error(error):
            raise
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
