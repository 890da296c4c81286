"""torchrun worker for the skipped-forward test: a mixed batch (fresh, age 1, age 2) through
``batching.batch_forwards`` with and without reusing what is already known.

python -m torch.distributed.run --nproc_per_node N -m tests.distributed.forwards_worker TINY OUT [overrides]

pi_1 generates (and values) the age-1 rows, pi_2 = pi_1 moved by noise the fresh rows; the age-2
rows carry made-up behaviour log-probs and values, as they would from an older policy. ``prev``
holds pi_1 and the critic is the one that valued the fresh rows, as in the loop.
"""

import json
import sys

import numpy as np
import torch

from remix_megatron import batching
from remix_megatron.algorithms.megatron_adapter import forward_values
from remix_megatron.config import load_config
from remix_megatron.data import PromptSource, load_records
from remix_megatron.parallel import destroy_parallel, init_parallel
from remix_megatron.policies import build_models, copy_weights
from remix_megatron.store import Trajectory


def perturb(chunks, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for _, param in chunk.named_parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def records_for(prompts, iteration: int, seed: int) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for index, prompt in enumerate(prompts):
        response = rng.integers(4, 36, size=int(rng.integers(3, 13)))
        out.append(Trajectory(iteration=iteration, prompt_id=prompt.id, group_id=index, prompt_tokens=prompt.token_ids,
                              response_tokens=response, reward=float(rng.integers(0, 2)),
                              behaviour_logprobs=np.zeros(response.size, dtype=np.float32), finish_reason="stop"))
    return out


def with_forwards(records, models, cfg, state, *, fake: int | None = None) -> list[Trajectory]:
    behaviour, values = batching.recompute_behaviour(records, actor=models.actor.chunks, critic=models.critic.chunks,
                                                     micro_batch_size=cfg.trainer.micro_batch_size,
                                                     seq_length=cfg.trainer.seq_length, state=state)
    if fake is not None:  # an older policy's numbers: anything but the current models'
        rng = np.random.default_rng(fake)
        behaviour = [-rng.random(b.size).astype(np.float32) for b in behaviour]
        values = [rng.random(v.size).astype(np.float32) for v in values]
    return [Trajectory(iteration=r.iteration, prompt_id=r.prompt_id, group_id=r.group_id, prompt_tokens=r.prompt_tokens,
                       response_tokens=r.response_tokens, reward=r.reward, behaviour_logprobs=b, values=v,
                       finish_reason="stop")
            for r, b, v in zip(records, behaviour, values)]


def main(tiny: str, out: str, *overrides: str) -> None:
    cfg = load_config("configs/tiny_remix_ppo.yaml", [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
                                                      "trainer.micro_batch_size=4", *overrides])
    state = init_parallel(cfg)
    models = build_models(cfg, state, with_critic=True)
    from remix_megatron.data import load_tokenizer

    source = PromptSource(load_records(cfg.data.train_path)[:30], load_tokenizer(tiny),
                          template=cfg.data.template, max_prompt_tokens=cfg.rollout.max_prompt_tokens)
    prompts = source.prompts
    age1 = with_forwards(records_for(prompts[:10], 1, seed=1), models, cfg, state)  # pi_1, critic_1
    copy_weights(models.actor.unwrapped(), models.prev)  # the loop's copy at iteration 1
    perturb(models.actor.chunks, seed=2)  # pi_2
    perturb(models.critic.chunks, seed=3)
    fresh = with_forwards(records_for(prompts[10:20], 2, seed=4), models, cfg, state)
    age2 = with_forwards(records_for(prompts[20:30], 0, seed=5), models, cfg, state, fake=6)
    pool, ages = age1 + fresh + age2, np.array([1] * 10 + [0] * 10 + [2] * 10)
    batch = batching.TrainingBatch.pack(2, pool, ages, seed=cfg.trainer.seed, micro_batch_size=4, global_batch_size=4,
                                        seq_length=cfg.trainer.seq_length, state=state)
    mask, ages = batch.rows.mask, batch.ages
    assert batch.real == 30 and len(batch.records) == 32  # 8 steps of one micro-batch of 4

    forwarded_rows = []
    counted = batching.forward_logprobs

    def counting(chunks, batches, state):
        forwarded_rows.append(sum(b.tokens.size(0) for b in batches))
        return counted(chunks, batches, state)

    batching.forward_logprobs = counting
    run = dict(actor=models.actor.chunks, ref=models.ref, prev=models.prev, critic=models.critic.chunks,
               micro_batch_size=4, state=state)
    reused = batching.batch_forwards(batch, **run)
    rows_reused = sum(forwarded_rows)
    forwarded_rows.clear()
    full = batching.batch_forwards(batch, **run, reuse_known=False)
    rows_full = sum(forwarded_rows)
    reused, full = [reused.pik, reused.ref, reused.prev, reused.values], [full.pik, full.ref, full.prev, full.values]
    result = {"rows_reused": rows_reused, "rows_full": rows_full,
              "max_gap": {name: float(((a - b) * mask).abs().max())
                          for name, a, b in zip(("pik", "ref", "prev", "values"), reused, full)},
              "outside_mask": max(float((t * (1 - mask)).abs().max()) for t in reused),
              "age2_differs": float(((reused[0] - batch.rows.behaviour).abs() * mask)[ages == 2].max())}
    # The critic's clip centre in the training batch is the current critic's value on every row
    # (on replayed rows not the stale value stored when they were generated).
    forwards = batching.batch_forwards(batch, **run)
    estimate = batching.estimate_advantages(batch, forwards, cfg.algorithm, state)
    _, critic_batches = batching.training_micro_batches(batch, forwards, estimate, 4, cfg.algorithm)
    current = forward_values(models.critic.chunks, critic_batches, state)
    centre = torch.cat([b.critic.old_values for b in critic_batches])
    loss_mask = torch.cat([b.critic.loss_mask for b in critic_batches])
    result["centre_gap"] = float(((centre - current) * loss_mask).abs().max())
    with open(f"{out}.rank{state.rank}.json", "w") as f:
        json.dump(result, f)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
