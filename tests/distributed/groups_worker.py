"""torchrun worker for the process-group test: which code still reads Megatron's global parallel state.

python -m torch.distributed.run --nproc_per_node N -m tests.distributed.groups_worker OUT [overrides]

After ``init_parallel`` (the one place allowed to read the globals), every call into a function
of ``megatron.core.parallel_state`` is recorded while the actor and critic are built, wrapped,
trained one step, run forward, resharded, exported and checkpointed. Writes ``OUT.rank<R>.json``:
``readers`` {reader: [parallel_state functions]} where the reader is the nearest calling function
outside parallel_state (and outside megatron's group-or-default helper, which only forwards), and
``same_groups``: whether Megatron's objects hold the groups of ``ParallelState.pg_collection``.
"""

import json
import sys
import threading
from functools import partial

import torch

from remix_megatron.algorithms.megatron_adapter import MicroBatch, forward_logprobs, forward_values, run_pipeline
from remix_megatron.checkpoint import load_checkpoint, save_checkpoint
from remix_megatron.config import load_config
from remix_megatron.convert.export import megatron_logits
from remix_megatron.models import build_actor, build_critic, iter_full_tensors, load_full_state_dict, make_trainable
from remix_megatron.models.logprobs import vocab_parallel_logprobs_entropy
from remix_megatron.parallel import destroy_parallel, init_parallel

# Forwards the group it is given; a None group is the caller's choice, so the caller is the reader.
PASS_THROUGH = {("megatron.core.utils", "get_tensor_model_parallel_group_if_none")}
# Whether the globals exist (called on every use of the helper above); reads no group.
NOT_A_READ = {"is_initialized"}


class GlobalReads:
    """Records calls into ``megatron.core.parallel_state`` from outside it, in every thread."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.target = parallel_state.__file__
        self.readers: dict[str, set[str]] = {}

    def _profile(self, frame, event, arg) -> None:
        if event != "call" or frame.f_code.co_filename != self.target or frame.f_code.co_name in NOT_A_READ:
            return
        caller = frame.f_back
        while caller is not None and (caller.f_code.co_filename == self.target or
                                      (caller.f_globals.get("__name__"), caller.f_code.co_name) in PASS_THROUGH):
            caller = caller.f_back
        if caller is not None:
            reader = f"{caller.f_globals.get('__name__')}.{caller.f_code.co_qualname}"
            self.readers.setdefault(reader, set()).add(frame.f_code.co_name)

    def __enter__(self) -> "GlobalReads":
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        threading.setprofile(None)


def train_step(model, batches, loss, state) -> None:
    model.zero_grad()
    run_pipeline(model.chunks, batches, lambda batch: partial(loss, state, batch), state, forward_only=False)
    assert model.step()[0], "the optimizer step was skipped"


def actor_loss(state, batch, logits):
    logprobs, _ = vocab_parallel_logprobs_entropy(logits, batch.labels, state.tp_group)
    return -logprobs.sum(), torch.tensor(logprobs.numel(), dtype=torch.int), {}


def critic_loss(state, batch, values):
    return values.float().square().sum(), torch.tensor(values.numel(), dtype=torch.int), {}


def same_groups(actor, state) -> dict[str, bool]:
    """Whether GPTModel, DDP and the optimizer hold exactly the groups of ``state.pg_collection``."""
    groups = state.pg_collection
    model, wrapped = actor.unwrapped()[0], actor.chunks[0]
    optimizers = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    return {"gpt_model": model.pg_collection is groups,
            "ddp": (wrapped.dp_cp_group, wrapped.tp_group, wrapped.pp_group) == (groups.dp_cp, groups.tp, groups.pp),
            "optimizer": all(o.tp_group is groups.tp for o in optimizers)}


def main(out: str, *overrides: str) -> None:
    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.save_interval=-1", *overrides])
    state = init_parallel(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [MicroBatch(tokens=tokens, labels=torch.roll(tokens, -1, 1))
               for tokens in torch.randint(0, cfg.model.vocab_size, (4, 2, 12), generator=gen)]
    with GlobalReads() as reads:
        actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
        critic = make_trainable(build_critic(cfg.model, state, seed=1), cfg.critic_optimizer, cfg.parallel, state)
        reference = build_actor(cfg.model, state)
        train_step(actor, batches, actor_loss, state)
        train_step(critic, batches, critic_loss, state)
        forward_logprobs(reference, batches, state)
        forward_values(critic.chunks, batches, state)
        load_full_state_dict(reference, dict(iter_full_tensors(actor.chunks, state)), state)
        if state.virtual_pipeline == 1:  # export runs one micro-batch, which the interleaved schedule refuses
            megatron_logits(reference, batches[0].tokens, state)
        models = {"actor": actor, "critic": critic}
        save_checkpoint(f"{out}.checkpoints", 1, models, state, {}, config=cfg)
        load_checkpoint(f"{out}.checkpoints", models, state)
    result = {"readers": {reader: sorted(names) for reader, names in reads.readers.items()},
              "same_groups": same_groups(actor, state)}
    with open(f"{out}.rank{state.rank}.json", "w") as handle:
        json.dump(result, handle)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
