"""Real Megatron-core on gloo: every TP/PP/DP layout computes what one process computes.

A 1-process TP1/PP1 run of `remix-megatron smoke` (the trainer's iterations on a synthetic
batch: actor with the full ReMix loss + critic with the clipped value loss, 3 iterations of 2
UTD passes = 6 Adam steps each, responses of different lengths so DP ranks hold different token
counts) with 4 micro-batches is the reference. Each layout loads the reference's initial
weights, then must give the same per-token pi_k / reference / precedent log-probs and critic
values of the first iteration, the same loss metrics, the same full gradients of the first
step, and the same parameters after 6 optimizer steps (1e-5). The learning rate is large enough that wrong
gradients would move the parameters far outside that tolerance (checked below). Adam's
epsilon is 1e-6 rather than 1e-8: near-zero gradients make an Adam step sensitive to float
rounding by lr/eps, which at eps=1e-8 turns 1e-10 summation-order noise into 1e-5 updates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed

TOL = 1e-5
BASE = ["configs/tiny_cpu.yaml", "trainer.global_batch_size=4", "trainer.micro_batch_size=1",
        "trainer.seq_length=16", "trainer.num_steps=3", "actor_optimizer.lr=1e-3", "critic_optimizer.lr=1e-3",
        "actor_optimizer.adam_eps=1e-6", "critic_optimizer.adam_eps=1e-6",
        "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "trainer.save_interval=-1"]
LAYOUTS = {
    "one_micro_batch": (1, ["trainer.micro_batch_size=4"]),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
    "tp2xpp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    "dp2": (2, []),
    "dp2_distributed_optimizer": (2, ["parallel.use_distributed_optimizer=true"]),
    "pp2_vpp2": (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]),
}


def run_smoke(out: Path, nproc: int, overrides: list[str], init_from: Path | None = None) -> str:
    args = ["smoke", *BASE, *overrides, f"trainer.run_dir={out / 'run'}", "--dump", str(out)]
    if init_from is not None:
        args += ["--init-from", str(init_from)]
    return run_cli(args, nproc=nproc).stdout


def merged(out: Path, name: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(out.glob(f"{name}_stage*.safetensors"))
    assert files, f"no {name} files in {out}"
    for path in files:
        part = load_file(str(path))
        assert not set(part) & set(tensors), f"stages overlap in {name}"
        tensors.update(part)
    return tensors


def assert_same(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), f"{what}: names differ: {set(actual) ^ set(expected)}"
    worst = max(((actual[k] - expected[k]).abs().max().item(), k) for k in expected)
    assert worst[0] <= TOL, f"{what}: {worst[1]} differs by {worst[0]:.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_smoke(out, 1, [])
    save_file(merged(out, "init"), str(out / "init_full.safetensors"))
    return out


def test_reference_training_moves_parameters(reference):
    """Guards the tolerance: 6 steps move weights by far more than TOL, so equality means something."""
    init, final = merged(reference, "init"), merged(reference, "final")
    for model in ("actor", "critic"):
        moved = max((final[k] - init[k]).abs().max().item() for k in init if k.startswith(model))
        assert moved > 100 * TOL, f"{model} barely moved ({moved:.1e})"
    grads = merged(reference, "grads_actor") | merged(reference, "grads_critic")
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    stdout = run_smoke(tmp_path, nproc, overrides, init_from=reference / "init_full.safetensors")
    assert "summary: layout=" in stdout
    assert_same(merged(tmp_path, "init"), merged(reference, "init"), "loaded weights")
    assert_same(load_file(str(tmp_path / "outputs.safetensors")), load_file(str(reference / "outputs.safetensors")),
                "pi_k/ref/prev log-probs and values")
    if "distributed_optimizer" not in layout:  # it keeps only this rank's shard of reduced grads
        for model in ("actor", "critic"):
            assert_same(merged(tmp_path, f"grads_{model}"), merged(reference, f"grads_{model}"), f"{model} gradients")
    assert_same(merged(tmp_path, "final"), merged(reference, "final"), "parameters after 6 steps")
    metrics, expected = (json.loads((out / "metrics.json").read_text()) for out in (tmp_path, reference))
    for model in ("actor", "critic"):
        assert metrics[model].keys() == expected[model].keys()
        for key, value in expected[model].items():
            assert metrics[model][key] == pytest.approx(value, rel=1e-4, abs=TOL), f"{model} metric {key}"
