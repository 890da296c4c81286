"""Weight sync from a TP/PP-sharded actor into each rank's engine, and log-prob agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from remix_megatron.rollout.weight_sync import LogprobMismatchError, check_logprob_gap
from tests.conftest import REPO
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    return make_hf_model("qwen2", root / "a", seed=0), make_hf_model("qwen2", root / "b", seed=1)


@pytest.mark.parametrize(("nproc", "tp", "pp"), [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2)])
def test_engine_receives_the_actor_weights(sources, tmp_path, nproc, tp, pp):
    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.distributed.sync_worker", str(sources[0]), str(sources[1]), str(out),
           f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(nproc):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result["max_param_diff"] == 0.0  # every rank's engine holds model B exactly
        assert result["tensors"] == result["expected_tensors"] and result["buckets"] > 3  # small buckets
        assert result["gap"] < 1e-4  # engine sampling log-probs == actor recomputed log-probs
        assert result["logits_gap"] < 1e-5  # engine logits == actor logits
        assert result["stale_logits_gap"] > 1e-3  # the optimizer step moved the actor away...
        assert result["logits_gap_after_step"] < 1e-5  # ...and the next sync brought the engine along


def test_logprob_gap_threshold_raises():
    check_logprob_gap(0.01, 0.05)
    with pytest.raises(LogprobMismatchError, match="gap 0.2000 exceeds rollout.logprob_check_threshold=0.05"):
        check_logprob_gap(0.2, 0.05)
