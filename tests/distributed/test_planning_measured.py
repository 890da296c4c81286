"""The dry run's layout and byte counts against what the real Megatron actor and critic hold on
each rank (built on CPU/gloo, one optimizer step so that Adam's state exists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from remix_megatron.config import load_config
from remix_megatron.planning import plan_layout, plan_memory, stage_parameters
from tests.conftest import REPO

pytestmark = pytest.mark.distributed

LAYOUTS = {  # name: (processes, overrides)
    "tp2": (2, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=1"]),
    "pp2_vpp2_dp2_distopt": (4, ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=2",
                                 "parallel.virtual_pipeline=2", "parallel.use_distributed_optimizer=true"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_dry_run_matches_the_built_models(name, tmp_path):
    nproc, overrides = LAYOUTS[name]
    out = tmp_path / "measured"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.distributed.planning_worker", str(out), *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    layout = plan_layout(cfg, nproc)
    plan = plan_memory(cfg, nproc)
    measured = [json.loads((tmp_path / f"measured.rank{rank}.json").read_text()) for rank in range(nproc)]
    for rank, record in enumerate(measured):
        tp_rank, pp_rank, dp_rank = layout.coordinates(rank)
        assert record["coordinates"] == [tp_rank, pp_rank, dp_rank], rank
        for kind in ("tp", "pp", "dp"):
            assert record["groups"][kind] in layout.groups(kind), (rank, kind)
        assert record["layers"] == layout.stage_layers(pp_rank), rank
        rows = plan.stages[pp_rank].rows
        for model, critic in (("actor", False), ("critic", True)):
            counts = record[model]
            assert counts["parameters"] == stage_parameters(cfg.model, layout, pp_rank, critic=critic), (rank, model)
            assert counts["weight_bytes"] == rows[f"{model} weights"] == 4 * counts["parameters"]  # fp32 on CPU
            assert counts["grad_bytes"] == rows[f"{model} grads (fp32)"]
            if not cfg.parallel.use_distributed_optimizer:
                assert counts["optimizer_bytes"] == rows[f"{model} Adam states"] == 8 * counts["parameters"]
    if cfg.parallel.use_distributed_optimizer:  # Adam sharded over DP: the shards add up, each about 1/DP
        for pp_rank in range(layout.pipeline_parallel):
            for model in ("actor", "critic"):
                shards = [r[model]["optimizer_bytes"] for r in measured if r["coordinates"][1] == pp_rank]
                assert len(shards) == layout.data_parallel == 2
                assert sum(shards) == 8 * measured[layout.rank(0, pp_rank, 0)][model]["parameters"]
                planned = plan.stages[pp_rank].rows[f"{model} Adam states"]
                assert all(abs(shard - planned) <= 64 for shard in shards), (shards, planned)
