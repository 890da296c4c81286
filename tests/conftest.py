"""Shared test helpers: running the CLI under torchrun, GPU skipping, repo paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Overrides for a run that evaluates nothing (the tiny configs evaluate by rollouts and by iterations).
NO_EVAL = ("data.eval_interval=0", "data.eval_every_rollouts=0")


def run_cli(args: list[str], *, nproc: int = 1, timeout_s: int = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``remix-megatron ARGS`` under torchrun with ``nproc`` local processes; raise on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "remix_megatron.cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                             f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import torch

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if importlib.util.find_spec("vllm") is None:
        skips["vllm"] = pytest.mark.skip(reason="needs vLLM: `make test-vllm` builds its environment")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
