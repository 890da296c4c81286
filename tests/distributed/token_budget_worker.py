"""torchrun worker for the token-budget test: the same batch through fixed-size and token-budget
micro-batches, for the behaviour recompute, the forward passes and each minibatch's gradients.

python -m torch.distributed.run --nproc_per_node N -m tests.distributed.token_budget_worker TINY OUT BUDGET [overrides]

Responses have lengths from 1 to 40 tokens (widths 8 to 48), so budgeted micro-batches differ
in rows and width; each DP rank gets a different number of rows. The override ``skew=1`` gives
DP rank 0 short responses (1-8 tokens) and the others long ones (24-40): the long tail on one side,
for ``trainer.balance_data_parallel`` to even out. With the overrides
``trainer.packed_sequences=true trainer.max_tokens_per_micro_batch=BUDGET`` (GPU, TransformerEngine)
the budgeted side is packed end to end (THD).
"""

import json
import sys

import numpy as np
import torch

from remix_megatron import batching
from remix_megatron.algorithms import kl_lambda
from remix_megatron.algorithms.megatron_adapter import actor_loss_builder, critic_loss_builder, run_pipeline
from remix_megatron.config import load_config
from remix_megatron.data import PromptSource, load_records, load_tokenizer
from remix_megatron.parallel import destroy_parallel, init_parallel
from remix_megatron.policies import build_models, copy_weights
from remix_megatron.store import Trajectory
from remix_megatron.updates import utd_passes
from tests.distributed.forwards_worker import perturb


def records_for(prompts, seed: int, lengths: tuple[int, int] = (1, 41)) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for index, prompt in enumerate(prompts):
        response = rng.integers(4, 36, size=int(rng.integers(*lengths)))
        out.append(Trajectory(iteration=1, prompt_id=prompt.id, group_id=index, prompt_tokens=prompt.token_ids,
                              response_tokens=response, reward=float(rng.integers(0, 2)),
                              behaviour_logprobs=np.zeros(response.size, dtype=np.float32), finish_reason="stop"))
    return out


def gradients(model) -> list[torch.Tensor]:
    return [param.main_grad.detach().clone().flatten() for chunk in model.chunks for param in chunk.parameters()]


def loss_tokens(batches) -> int:
    return int(sum(float((b.actor if b.actor is not None else b.critic).loss_mask.sum()) for b in batches))


def minibatch_gaps(model, passes_fixed, passes_budget, builder, state) -> list[float]:
    """Per minibatch: the largest gradient difference relative to the gradient's largest entry."""
    gaps = []
    for fixed, budget in zip(passes_fixed, passes_budget, strict=True):
        grads = []
        for batches in (fixed, budget):
            model.zero_grad()
            run_pipeline(model.chunks, batches, builder, state, forward_only=False)
            grads.append(torch.cat(gradients(model)))
        scale = float(grads[0].abs().max())
        assert scale > 0, "no gradient: the test would prove nothing"
        gaps.append(float((grads[0] - grads[1]).abs().max()) / scale)
    return gaps


def padded_tokens(batches) -> int:
    """Positions a rank computes for these micro-batches (rows x width; packed: the sequence)."""
    return int(sum(b.tokens.numel() for b in batches))


def main(tiny: str, out: str, budget: str, *overrides: str) -> None:
    budget = int(budget)
    skew = "skew=1" in overrides
    overrides = tuple(o for o in overrides if o != "skew=1")
    cfg = load_config("configs/tiny_remix_ppo.yaml", [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
                                                      "trainer.micro_batch_size=4", *overrides])
    state = init_parallel(cfg)
    models = build_models(cfg, state, with_critic=True)
    source = PromptSource(load_records(cfg.data.train_path)[:40], load_tokenizer(tiny), template=cfg.data.template,
                          max_prompt_tokens=cfg.rollout.max_prompt_tokens)
    lengths = ((1, 9) if state.dp_rank == 0 else (24, 41)) if skew else (1, 41)
    records = records_for(source.prompts[: 30 + 7 * state.dp_rank], seed=10 + state.dp_rank, lengths=lengths)
    common = dict(actor=models.actor.chunks, critic=models.critic.chunks, micro_batch_size=4,
                  seq_length=cfg.trainer.seq_length, state=state)
    behaviour, values = batching.recompute_behaviour(records, **common)
    packed, balance = cfg.trainer.packed_sequences, cfg.trainer.balance_data_parallel
    behaviour_budget, values_budget = batching.recompute_behaviour(records, **common, max_tokens=budget, packed=packed,
                                                                   balance=balance)
    result = {"recompute_gap": max(float(np.abs(a - b).max(initial=0)) for a, b in
                                   zip(behaviour + values, behaviour_budget + values_budget, strict=True))}
    records = [Trajectory(iteration=r.iteration, prompt_id=r.prompt_id, group_id=r.group_id,
                          prompt_tokens=r.prompt_tokens, response_tokens=r.response_tokens, reward=r.reward,
                          behaviour_logprobs=b, values=v, finish_reason="stop")
               for r, b, v in zip(records, behaviour, values)]
    copy_weights(models.actor.unwrapped(), models.prev)
    perturb(models.actor.chunks, seed=2)  # the actor moved since it generated: ratios != 1, some clipped
    ages = np.array([1, 2] * (len(records) // 2) + [1] * (len(records) % 2))
    batch = batching.TrainingBatch.pack(2, records, ages, seed=cfg.trainer.seed, micro_batch_size=4,
                                        global_batch_size=16, seq_length=cfg.trainer.seq_length, state=state)
    run = dict(actor=models.actor.chunks, ref=models.ref, prev=models.prev, critic=models.critic.chunks,
               micro_batch_size=4, state=state)
    fixed = batching.batch_forwards(batch, **run)
    budgeted = batching.batch_forwards(batch, **run, max_tokens=budget, packed=packed, balance=balance)
    result["forward_gap"] = max(float((a - b).abs().max()) for a, b in
                                zip((fixed.pik, fixed.ref, fixed.prev, fixed.values),
                                    (budgeted.pik, budgeted.ref, budgeted.prev, budgeted.values)))
    estimate = batching.estimate_advantages(batch, fixed, cfg.algorithm, state)
    actor_batches, critic_batches = batching.training_micro_batches(batch, fixed, estimate, 4, cfg.algorithm)
    plan = dict(utd=2, steps=batch.steps, seed=(cfg.trainer.seed, 2), state=state)
    for name, model, micro, builder in (
            ("actor", models.actor, actor_batches,
             actor_loss_builder(cfg.algorithm, state, kl_lambda=kl_lambda(2, cfg.algorithm))),
            ("critic", models.critic, critic_batches, critic_loss_builder(cfg.algorithm))):
        passes_fixed = utd_passes(micro, **plan)
        passes_budget = utd_passes(micro, **plan, max_tokens=budget, multiple=batch.rows.multiple, packed=packed,
                                   balance=balance)
        result[f"{name}_gaps"] = minibatch_gaps(model, passes_fixed, passes_budget, builder, state)
        result[f"{name}_tokens"] = [[loss_tokens(part) for part in passes] for passes in (passes_fixed, passes_budget)]
        result[f"{name}_counts"] = [len(part) for part in passes_budget]
        result[f"{name}_padded"] = [padded_tokens(part) for part in passes_budget]
        result[f"{name}_shapes"] = [[list(b.tokens.shape) for b in part] for part in passes_budget]
    result["steps"] = batch.steps
    with open(f"{out}.rank{state.rank}.json", "w") as f:
        json.dump(result, f)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
