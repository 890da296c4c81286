"""Every command block of README.md, run as a user pastes it: through bash, in a scratch copy of the
repository (so `runs/` and the relative paths land there), with tiny sizes where a command would
run long and stand-ins where it needs a cluster. A block or command this file does not know fails
`test_every_readme_command_is_covered`: add it to COMMANDS (how it runs here) and to a section's
test (what it must leave behind), or name the file that runs it (`make test`: .ci/run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import NO_EVAL, REPO
from tests.unit.test_launch import STUB_PYTHON, STUB_SCONTROL, STUB_SRUN, torchrun

README = REPO / "README.md"
SHELL = ("bash", "sh", "console")
# Fenced blocks that hold no commands, by the section they sit in.
NOT_COMMANDS = {"Layout": "a directory tree"}
MARK = "@@@ README command"  # printed before each command, to split the block's output per command
SETUP = "Set up and run (fresh machine, Python 3.11, no GPU needed)"
# Not inherited from the test's environment: a cluster's (the launchers read them) and an outer make's.
UNSET = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID", "MAKEFLAGS", "MAKELEVEL",
         "MFLAGS")
STUB_SBATCH = """#!/usr/bin/env bash
# sbatch stand-in: runs the batch script at once, in the allocation its --nodes / --gpus-per-node ask for
while [[ "$1" == --* ]]; do
    case "$1" in
        --nodes=*) export SLURM_JOB_NUM_NODES="${1#*=}" ;;
        --gpus-per-node=*) export SLURM_GPUS_ON_NODE="${1#*=}" ;;
        *) echo "sbatch stand-in: unknown option $1" >&2; exit 9 ;;
    esac
    shift
done
hosts=$(for (( n = 1; n <= SLURM_JOB_NUM_NODES; n++ )); do printf 'node%02d ' "$n"; done)
export SLURM_JOB_ID=7 SLURM_SUBMIT_DIR="$PWD" SLURM_JOB_NODELIST="node[01-$(printf %02d "$SLURM_JOB_NUM_NODES")]" \\
    FAKE_HOSTS="$hosts"
exec bash "$@"
"""


@dataclass(frozen=True)
class Block:
    section: str  # the heading above it
    line: int  # of its opening fence
    info: str  # the fence's language
    text: str


@dataclass(frozen=True)
class Run:
    """Run the command as written after these substitutions (tiny sizes, placeholders), for ``why``."""

    replace: tuple[tuple[str, str], ...] = ()
    append: str = ""
    why: str = ""

    def command(self, text: str) -> str:
        for old, new in self.replace:
            assert old in text, (old, text)
            text = text.replace(old, new)
        return text + self.append


@dataclass(frozen=True)
class Elsewhere:
    """Not run here: ``path`` runs it, as one of its lines (checked), for ``why``."""

    path: str
    why: str


PLACEHOLDER_HF = Run(replace=(("/path/to/hf", "$README_HF"),), why="the section's test gives the HF directory")
SCALE_32B = "configs/scale_32b_remix_ppo.yaml model.hf_path=/path/to/hf"
# Every command of the README's shell blocks (continuations joined, comments dropped, spaces collapsed).
COMMANDS: dict[str, Run | Elsewhere] = {
    "make demo": Run(replace=(("make demo", "make -o .venv/.installed demo"),),
                     append=f" ARGS='trainer.num_steps=2 rollout.prompts_per_step=16 {' '.join(NO_EVAL)}'",
                     why="2 iterations (the whole job: tests/e2e/test_main_job.py); -o: the environment is the test's"),
    "make lint": Elsewhere(".ci/run", "the linter, run before the tests"),
    "make test": Elsewhere(".ci/run", "the test suite itself, this file included"),
    "make test-vllm": Elsewhere(".ci/run", "builds the 2.9 GB vLLM environment and runs its tier"),
    ".venv/bin/remix-megatron config show configs/tiny_cpu.yaml parallel.tensor_parallel=1": Run(),
    "tiny=$(.venv/bin/remix-megatron tiny --path-only)": Run(),
    ".venv/bin/remix-megatron config check configs/tiny_remix_ppo_tp2pp2.yaml --world-size 4 model.hf_path=$tiny "
    "data.train_path=$tiny/train.jsonl data.eval_path=$tiny/heldout.jsonl": Run(),
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 NPROC_PER_NODE=8 launch/multinode.sh train " + SCALE_32B: PLACEHOLDER_HF,
    "sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sbatch " + SCALE_32B: PLACEHOLDER_HF,
    "NPROC_PER_NODE=4 launch/torchrun.sh convert verify-hf configs/tiny_cpu.yaml model.hf_path=/path/to/hf":
        PLACEHOLDER_HF,
    "NPROC_PER_NODE=4 launch/torchrun.sh convert from-hf configs/tiny_cpu.yaml model.hf_path=/path/to/hf":
        PLACEHOLDER_HF,
    ".venv/bin/python tools/convert_to_hf.py runs/tiny_cpu/checkpoints --out runs/tiny_cpu/hf_actor": Run(),
    ".venv/bin/remix-megatron evaluate --model $tiny --benchmarks heldout=$tiny/heldout.jsonl,math500 --limit 64 "
    "--template '{problem}' --max-prompt-tokens 16 --max-new-tokens 40 --overlong truncate --out runs/eval_tiny": Run(),
    ".venv/bin/torchrun --standalone --nproc_per_node=2 -m remix_megatron.cli evaluate --checkpoint "
    "runs/tiny_remix_ppo/checkpoints --benchmarks heldout=$tiny/heldout.jsonl --template '{problem}' "
    "--max-prompt-tokens 16 --max-new-tokens 40 --out runs/eval_ckpt": Run(),
}
SECTION_TESTS: dict[str, str] = {}  # README section -> the test here that runs its blocks


def covers(section: str):
    """Register ``test`` as the one that runs ``section``'s blocks."""
    def register(test):
        SECTION_TESTS[section] = test.__name__
        return test
    return register


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, each under its nearest heading (indented fences included)."""
    blocks, section, opened = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.fullmatch(r"(\s*)```(\S*)\s*", line)
        if opened is None:
            if heading := re.fullmatch(r"#{2,} (.+)", line):
                section = heading[1].strip()
            elif fence:
                opened, indent, info, lines = number, len(fence[1]), fence[2], []
        elif fence and not fence[2]:
            blocks.append(Block(section, opened, info, "\n".join(lines)))
            opened = None
        else:
            lines.append(line[indent:] if not line[:indent].strip() else line.lstrip())
    assert opened is None, f"README.md: the block opened at line {opened} is never closed"
    return blocks


def strip_comment(line: str) -> str:
    """``line`` without its shell comment (a ``#`` at a word start outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def block_commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped, spaces collapsed."""
    commands, pending = [], ""
    for line in text.splitlines():
        line = pending + strip_comment(line).rstrip()
        pending = line[:-1] + " " if line.endswith("\\") else ""
        if not pending and line.strip():
            commands.append(" ".join(line.split()))
    return commands


def section_commands(section: str) -> list[str]:
    return [command for block in readme_blocks(README.read_text()) if block.section == section
            and block.info in SHELL for command in block_commands(block.text)]


@pytest.mark.unit
def test_every_readme_command_is_covered():
    blocks = readme_blocks(README.read_text())
    shell = [block for block in blocks if block.info in SHELL]
    others = [f"line {b.line} ({b.section})" for b in blocks if b.info not in SHELL and b.section not in NOT_COMMANDS]
    assert not others, f"README blocks that are neither shell commands nor listed in NOT_COMMANDS: {others}"
    commands = [command for block in shell for command in block_commands(block.text)]
    unknown = [command for command in commands if command not in COMMANDS]
    assert not unknown, ("README commands this test does not know (new or edited: add each to COMMANDS, with the "
                         f"tiny sizes it runs with, or the file that runs it): {unknown}")
    stale = [command for command in COMMANDS if command not in commands]
    assert not stale, f"COMMANDS entries no longer in the README: {stale}"
    not_there = [(c, how.path) for c, how in COMMANDS.items() if isinstance(how, Elsewhere)
                 and c not in (REPO / how.path).read_text().splitlines()]
    assert not not_there, f"commands their Elsewhere file does not run: {not_there}"
    untested = sorted({block.section for block in shell} - set(SECTION_TESTS))
    assert not untested, f"README sections whose blocks no test here runs (add one with @covers): {untested}"


@pytest.mark.unit
def test_block_parsing_joins_continuations_and_drops_comments():
    text = ("# a comment line\n"
            "a=$(x --y)   # trailing comment\n"
            "run --template '{problem} # kept' \\\n"
            "    --out dir  # end\n\n"
            "last  arg\n")
    assert block_commands(text) == ["a=$(x --y)", "run --template '{problem} # kept' --out dir", "last arg"]
    markdown = "## One\n```bash\nx\n```\n## Two\n- item:\n  ```bash\n  y \\\n    z\n  ```\n```\ntree\n```\n"
    assert readme_blocks(markdown) == [Block("One", 2, "bash", "x"), Block("Two", 7, "bash", "y \\\n  z"),
                                       Block("Two", 11, "", "tree")]



@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A scratch copy of the repository (links to its files, `.venv` the test's own environment) beside a
    link to ../shared, so the README's relative paths resolve as in the repository and nothing is written there."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").symlink_to(REPO.parent / "shared")
    copy = root / "repo"
    copy.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv", "runs", "logs", ".pytest_cache"):
            (copy / entry.name).symlink_to(entry)
    (copy / ".venv").symlink_to(sys.prefix)
    return copy


def run_section(clone: Path, section: str, env: dict | None = None, timeout_s: int = 800) -> list[str]:
    """Run ``section``'s shell blocks in ``clone`` as one bash script; the stdout of each command run, in order."""
    assert section in SECTION_TESTS, section
    script = []
    for number, command in enumerate(section_commands(section)):
        how = COMMANDS[command]
        if isinstance(how, Run):
            script += [f"echo '{MARK} {number}'", how.command(command)]
    # PYTHONPATH: the console scripts import this tree, whatever the environment's editable install points at
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in UNSET}
    full_env.update(PYTHONPATH=str(clone), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=clone, env=full_env,
                            capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, (f"README section {section!r} exited {result.returncode}\n--- script\n"
                                    + "\n".join(script) + f"\n--- stdout\n{result.stdout[-4000:]}"
                                    f"\n--- stderr\n{result.stderr[-6000:]}")
    return [part.split("\n", 1)[1] if "\n" in part else "" for part in result.stdout.split(MARK)[1:]]


@pytest.fixture(scope="module")
def tiny():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="module")
def demo(clone):
    """`make demo` at 2 iterations: its run directory is the one the Evaluation block reads."""
    (out,) = run_section(clone, SETUP)
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.e2e
@covers(SETUP)
def test_set_up_and_run(clone, demo, tiny):
    run = clone / "runs" / "tiny_remix_ppo"
    assert [r["iteration"] for r in records(run / "metrics.jsonl")] == [1, 2] and "[2/2]" in demo
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["hf_path"] == str(tiny) and resolved["data"]["train_path"] == f"{tiny}/train.jsonl"
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000002"
    assert (run / "hf_actor" / "config.json").is_file() and (run / "reward.png").is_file()


@pytest.mark.e2e
@covers("Configs")
def test_configs(clone):
    show, _, check = run_section(clone, "Configs")  # the middle one sets $tiny
    shown = yaml.safe_load(show)
    assert shown["parallel"]["tensor_parallel"] == 1 and shown["parallel"]["pipeline_parallel"] == 2  # file's PP
    assert check.strip() == "OK: world size 4 = TP2 x PP2 x DP1"


@pytest.mark.e2e
@covers("Launch, dry run, sweeps")
def test_launch_lines_start_valid_runs(clone, tmp_path):
    """The launchers run with stand-ins for the interpreter, sbatch, srun and scontrol (each prints its command
    line); the training command they would start passes `config check` at the world size they give it."""
    import torch

    from remix_megatron.config import load_config
    from remix_megatron.convert.hf import hf_config_from_model

    hf = tmp_path / "hf_32b"  # a config.json of the 32B architecture stands in for the weights a cluster would have
    hf.mkdir()
    model = load_config(REPO / "configs" / "scale_32b_remix_ppo.yaml").model
    (hf / "config.json").write_text(json.dumps(hf_config_from_model(model, critic=False, dtype=torch.bfloat16)))
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("python", STUB_PYTHON), ("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL),
                       ("sbatch", STUB_SBATCH)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python"), "README_HF": str(hf)}
    multinode, sbatch = run_section(clone, "Launch, dry run, sweeps", env)
    cli = ("train", "configs/scale_32b_remix_ppo.yaml", f"model.hf_path={hf}")
    launched = [line for line in multinode.splitlines() if line.startswith("PYTHON ")]
    assert launched == [torchrun(2, 0, 8, "node01:29500", "remix", *cli)]
    launched_sbatch = [line for line in sbatch.splitlines() if line.startswith("PYTHON ")]
    assert launched_sbatch == [torchrun(2, node, 8, "node01:29507", "7", *cli, "trainer.resume=true")
                               for node in (0, 1)]  # master port 29500 + job id 7
    for command in (launched[0], launched_sbatch[0]):
        args = command.split(" -m remix_megatron.cli train ", 1)[1].split()
        check = subprocess.run([str(clone / ".venv" / "bin" / "remix-megatron"), "config", "check", args[0],
                                "--world-size", "16", *args[1:]], cwd=clone, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(clone)}, timeout=300)
        assert check.returncode == 0 and check.stdout.strip() == "OK: world size 16 = TP8 x PP2 x DP1", check.stderr


@pytest.mark.e2e
@pytest.mark.timeout(900)
@covers("Checkpoints and HuggingFace")
def test_checkpoints_and_huggingface(clone, tiny):
    from safetensors.torch import load_file

    verify, convert, export = run_section(clone, "Checkpoints and HuggingFace", {"README_HF": str(tiny)})
    assert "at TP2 x PP2: OK" in verify
    assert convert.strip() == f"converted {tiny} -> runs/tiny_cpu/checkpoints/iter_0000000"
    exported = clone / "runs" / "tiny_cpu" / "hf_actor"
    weights = {k: v for f in exported.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    source = load_file(str(tiny / "model.safetensors"))
    assert weights.keys() == source.keys()  # HF -> Megatron TP2 x PP2 -> HF gives back the same tensors
    assert all(weights[k].equal(source[k]) for k in source), [k for k in source if not weights[k].equal(source[k])]
    assert (exported / "tokenizer.json").is_file() and "(iteration 0) to runs/tiny_cpu/hf_actor" in export


@pytest.mark.e2e
@pytest.mark.timeout(900)
@covers("Evaluation")
def test_evaluation(clone, demo):
    import pyarrow.parquet as pq

    run_section(clone, "Evaluation")
    for out, sets, size, ranks in (("eval_tiny", ("heldout", "math500"), 64, 1), ("eval_ckpt", ("heldout",), 512, 2)):
        summary = json.loads((clone / "runs" / out / "summary.json").read_text())
        rows = pq.read_table(clone / "runs" / out / "generations.parquet").to_pylist()
        assert sorted(summary["benchmarks"]) == sorted(sets) and summary["settings"]["data_parallel"] == ranks
        for name in sets:
            assert sorted(r["problem_index"] for r in rows if r["benchmark"] == name) == list(range(size)), (out, name)
        heldout = [r["correct"] for r in rows if r["benchmark"] == "heldout"]
        assert summary["benchmarks"]["heldout"]["score"] == pytest.approx(sum(heldout) / size)
        assert 0.05 < summary["benchmarks"]["heldout"]["score"] < 0.9  # the tiny model's band, not a constant
