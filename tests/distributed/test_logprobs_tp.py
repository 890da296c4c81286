"""Vocab-parallel log-probs/entropy over a real gloo TP group equal the unsharded result.

Each of 2 ranks holds half the vocabulary; values and the gradient of a loss that mixes
log-probs and entropy (the case where a naive autograd all-reduce goes wrong) must equal the
full-vocabulary computation.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from remix_megatron.models.logprobs import vocab_parallel_logprobs_entropy

pytestmark = pytest.mark.distributed

WORLD = 2


def make_inputs():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 10, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, 10, (2, 4), generator=gen)
    weights = torch.randn(2, 2, 4, generator=gen, dtype=torch.float64)
    return logits, targets, weights


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    logits, targets, weights = make_inputs()
    part = logits.size(-1) // WORLD
    local = logits[..., rank * part:(rank + 1) * part].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs_entropy(local, targets, dist.group.WORLD)
    (lp * weights[0] + ent * weights[1]).sum().backward()
    torch.save({"lp": lp.detach(), "ent": ent.detach(), "grad": local.grad}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_tp2_equals_full_vocab(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    logits, targets, weights = make_inputs()
    full = logits.clone().requires_grad_()
    logp = torch.log_softmax(full, -1)
    ref_lp, ref_ent = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)
    (ref_lp * weights[0] + ref_ent * weights[1]).sum().backward()
    results = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]
    for res in results:
        torch.testing.assert_close(res["lp"], ref_lp.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(res["ent"], ref_ent.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["grad"] for r in results], -1), full.grad, rtol=0, atol=1e-12)
