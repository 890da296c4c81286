"""The critic's value head under sequence parallelism, over a real gloo TP group of 2.

With sequence parallelism the final hidden states reach the output layer split along the
sequence. The value head must gather them (as Megatron's output layer does): every rank gets
the values of the whole sequence, equal to the unsplit computation, every rank's weight
gradient is the full one, and each rank's input gradient is its own part of the full one.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.distributed

WORLD, SEQ, BATCH, HIDDEN = 2, 6, 3, 8


def make_inputs():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=gen), torch.randn(SEQ, BATCH, generator=gen)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    from remix_megatron.compat.cpu import install_cpu_adapter

    install_cpu_adapter()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from megatron.core import parallel_state as mpu

    from remix_megatron.models.build import ValueHead

    mpu.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    hidden, weights = make_inputs()
    part = SEQ // WORLD
    local = hidden[rank * part:(rank + 1) * part].clone().requires_grad_()
    head = ValueHead(HIDDEN, torch.float32, init_std=0.5, seed=1, tp_group=mpu.get_tensor_model_parallel_group(),
                     sequence_parallel=True)
    values, _ = head(local)
    (values.squeeze(-1) * weights).sum().backward()
    torch.save({"values": values.detach(), "input_grad": local.grad, "weight_grad": head.weight.grad,
                "bias_grad": head.bias.grad, "weight": head.weight.detach()}, os.path.join(out_dir, f"r{rank}.pt"))
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


def test_value_head_gathers_the_sequence(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"r{rank}.pt") for rank in range(WORLD)]
    hidden, weights = make_inputs()
    full = hidden.clone().requires_grad_()
    weight = results[0]["weight"].clone().requires_grad_()
    bias = torch.zeros(1, requires_grad=True)
    expected = F.linear(full, weight, bias)
    (expected.squeeze(-1) * weights).sum().backward()
    for result in results:
        assert result["values"].shape == (SEQ, BATCH, 1)
        torch.testing.assert_close(result["values"], expected.detach())
        torch.testing.assert_close(result["weight_grad"], weight.grad)
        torch.testing.assert_close(result["bias_grad"], bias.grad)
    torch.testing.assert_close(torch.cat([r["input_grad"] for r in results]), full.grad)
