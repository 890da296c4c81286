"""torchrun worker for the dry-run test: builds the real Megatron actor and critic, takes one
optimizer step (Adam creates its state lazily) and records what each rank actually holds.

python -m torch.distributed.run --nproc_per_node N -m tests.distributed.planning_worker OUT [overrides]

Writes ``OUT.rank<R>.json``: Megatron's coordinates and process-group ranks, the global layer
numbers of each model chunk, and parameter / fp32 gradient / Adam-state bytes of actor and critic.
"""

import json
import sys

import torch
import torch.distributed as dist

from remix_megatron.config import load_config
from remix_megatron.models import build_actor, build_critic, make_trainable
from remix_megatron.parallel import destroy_parallel, init_parallel


def optimizer_state_bytes(optimizer) -> int:
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total


def measure(model) -> dict:
    params = [p for chunk in model.unwrapped() for p in chunk.parameters()]
    for param in params:  # a zero gradient: the step creates Adam's state without moving anything far
        param.main_grad.zero_()
    model.optimizer.step()
    return {"parameters": sum(p.numel() for p in params),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.main_grad.numel() * p.main_grad.element_size() for p in params),
            "optimizer_bytes": optimizer_state_bytes(model.optimizer)}


def main(out: str, *overrides: str) -> None:
    from megatron.core import parallel_state as mpu

    cfg = load_config("configs/tiny_cpu.yaml", list(overrides))
    state = init_parallel(cfg)
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    critic = make_trainable(build_critic(cfg.model, state, seed=1), cfg.critic_optimizer, cfg.parallel, state)
    groups = {"tp": mpu.get_tensor_model_parallel_group(), "pp": mpu.get_pipeline_model_parallel_group(),
              "dp": mpu.get_data_parallel_group()}
    result = {
        "rank": state.rank, "coordinates": [state.tp_rank, state.pp_rank, state.dp_rank],
        "groups": {kind: dist.get_process_group_ranks(group) for kind, group in groups.items()},
        "layers": [[layer.layer_number - 1 for layer in chunk.decoder.layers] for chunk in actor.unwrapped()],
        "actor": measure(actor), "critic": measure(critic),
    }
    with open(f"{out}.rank{state.rank}.json", "w") as handle:
        json.dump(result, handle)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
