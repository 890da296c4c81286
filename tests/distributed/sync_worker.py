"""torchrun worker for the weight-sync test: actor holds model B, the engine starts as model A.

python -m torch.distributed.run --nproc_per_node N -m tests.distributed.sync_worker A B OUT [overrides]

Syncs, compares the engine's parameters with B and its sampling log-probs with the actor's,
then takes one optimizer step on the actor, syncs again and compares logits.
"""

import json
import sys
from functools import partial

import torch
import torch.distributed as dist

from remix_megatron.algorithms.megatron_adapter import MicroBatch, forward_logprobs, run_pipeline
from remix_megatron.config import load_config
from remix_megatron.convert.export import load_hf_into, megatron_logits
from remix_megatron.convert.hf import HFWeights
from remix_megatron.models import build_actor, make_trainable, vocab_parallel_logprobs_entropy
from remix_megatron.parallel import destroy_parallel, init_parallel
from remix_megatron.rollout import SamplingParams
from remix_megatron.rollout.hf_engine import HFEngine
from remix_megatron.rollout.weight_sync import logprob_gap, sync_weights


def logits_gap(engine, actor_chunks, state, tokens) -> float:
    logits = megatron_logits(actor_chunks, tokens, state)
    gap = torch.zeros((), dtype=torch.float64)
    if logits is not None:
        with torch.no_grad():
            gap = (engine.model(tokens).logits - logits).abs().max().double()
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return gap.item()


def one_step(actor, state, tokens) -> None:
    def loss(batch, logits):
        logprobs, _ = vocab_parallel_logprobs_entropy(logits, batch.labels, state.tp_group)
        return -logprobs.sum(), torch.tensor(logprobs.numel(), dtype=torch.int), {}

    actor.zero_grad()
    run_pipeline(actor.chunks, [MicroBatch(tokens=tokens, labels=torch.roll(tokens, -1, 1))],
                 lambda batch: partial(loss, batch), state, forward_only=False)
    actor.step()


def main(source_a: str, source_b: str, out: str, *overrides: str) -> None:
    cfg = load_config("configs/tiny_cpu.yaml", [f"model.hf_path={source_a}", "actor_optimizer.lr=1e-2", *overrides])
    state = init_parallel(cfg)
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    load_hf_into(source_b, cfg.model, state, actor=actor.unwrapped())
    actor.optimizer.reload_model_params()
    engine = HFEngine(source_a)
    stats = sync_weights(engine, actor.unwrapped(), state, cfg.model, bucket_bytes=64 << 10)
    expected = HFWeights(source_b)
    params = dict(engine.model.named_parameters())
    max_diff = max((params[n] - expected.get(n)).abs().max().item() for n in expected.names())
    prompts = [[5, 9, 11, 200], [7, 3, 8, 1]]
    generations = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=4))
    tokens = torch.tensor([(p + g[0].token_ids.tolist())[:12] for p, g in zip(prompts, generations)])
    actor_lp, _ = forward_logprobs(actor.chunks, [MicroBatch(tokens=tokens, labels=torch.roll(tokens, -1, 1))], state)
    actor_rows = [actor_lp[i, len(p) - 1:len(p) - 1 + len(g[0].logprobs)].numpy()
                  for i, (p, g) in enumerate(zip(prompts, generations))]
    before_step = logits_gap(engine, actor.chunks, state, tokens)
    one_step(actor, state, tokens)
    stale = logits_gap(engine, actor.chunks, state, tokens)
    sync_weights(engine, actor.unwrapped(), state, cfg.model, bucket_bytes=64 << 10)
    after_step = logits_gap(engine, actor.chunks, state, tokens)
    result = {"max_param_diff": max_diff, "gap": logprob_gap([g[0].logprobs for g in generations], actor_rows),
              "buckets": stats.buckets, "tensors": stats.tensors, "expected_tensors": len(expected.names()),
              "logits_gap": before_step, "stale_logits_gap": stale, "logits_gap_after_step": after_step}
    with open(f"{out}.rank{state.rank}.json", "w") as handle:
        json.dump(result, handle)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
