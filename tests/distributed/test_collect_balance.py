"""The DP ranks agree in one all-reduce whether the collection's behaviour recompute is balanced
over them: only when every rank recomputes, and a rank without prompts of its own (it returns
early) still joins the vote, so the others do not wait for it forever."""

import datetime
import json
import os
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from remix_megatron.config import load_config
from remix_megatron.rollout import collect as collect_module

pytestmark = pytest.mark.distributed

WORLD = 2


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    state = SimpleNamespace(data_parallel=WORLD, dp_rank=rank, dp_group=None)
    on = load_config("configs/tiny_remix_ppo.yaml", ["trainer.max_tokens_per_micro_batch=96"])
    off = load_config("configs/tiny_remix_ppo.yaml", ["trainer.max_tokens_per_micro_batch=96",
                                                     "trainer.balance_data_parallel=false"])
    vote = collect_module._every_rank_recomputes
    results = {"both": vote(True, on, state), "one": vote(rank == 0, on, state),
               "off": vote(True, off, state),  # no collective: the other rank does not call it
               "no_budget": vote(True, load_config("configs/tiny_remix_ppo.yaml"), state)}
    # one prompt: rank 0's; rank 1 has none and returns before generating, voting no on the way
    if rank == 0:
        results["early"] = vote(True, on, state)
    else:
        result = collect_module.collect(1, [SimpleNamespace(id="p0")], on, state, None, None, None,
                                        actor=None, critic=None, check_gap=False)
        results["early"] = result.records == []
    dist.barrier()
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_the_ranks_agree_on_balancing_the_recompute(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    first, second = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(WORLD))
    assert first == {"both": True, "one": False, "off": False, "no_budget": False, "early": False}
    assert second == {"both": True, "one": False, "off": False, "no_budget": False, "early": True}
