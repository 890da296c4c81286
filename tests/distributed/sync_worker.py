"""torchrun worker for the weight-sync test: actor holds model B, the engine starts as model A.

python -m torch.distributed.run --nproc_per_node N -m tests.distributed.sync_worker A B OUT [overrides]
"""

import json
import sys

import torch

from remix_megatron.algorithms.megatron_adapter import MicroBatch, forward_logprobs
from remix_megatron.config import load_config
from remix_megatron.convert.export import load_hf_into
from remix_megatron.convert.hf import HFWeights
from remix_megatron.models import build_actor
from remix_megatron.parallel import destroy_parallel, init_parallel
from remix_megatron.rollout import SamplingParams
from remix_megatron.rollout.hf_engine import HFEngine
from remix_megatron.rollout.weight_sync import logprob_gap, sync_weights


def main(source_a: str, source_b: str, out: str, *overrides: str) -> None:
    cfg = load_config("configs/tiny_cpu.yaml", [f"model.hf_path={source_a}", *overrides])
    state = init_parallel(cfg)
    actor = build_actor(cfg.model, state)
    load_hf_into(source_b, cfg.model, state, actor=actor)
    engine = HFEngine(source_a)
    stats = sync_weights(engine, actor, state, cfg.model, bucket_bytes=64 << 10)
    expected = HFWeights(source_b)
    params = dict(engine.model.named_parameters())
    max_diff = max((params[n] - expected.get(n)).abs().max().item() for n in expected.names())
    prompts = [[5, 9, 11, 200], [7, 3, 8, 1]]
    generations = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=4))
    width = 12
    tokens = torch.tensor([(p + g[0].token_ids.tolist())[:width] for p, g in zip(prompts, generations)])
    labels = torch.roll(tokens, -1, 1)
    actor_lp, _ = forward_logprobs(actor, [MicroBatch(tokens=tokens, labels=labels)], state)
    engine_lp = [g[0].logprobs for g in generations]
    actor_rows = [actor_lp[i, len(p) - 1:len(p) - 1 + len(g[0].logprobs)].numpy() for i, (p, g) in
                  enumerate(zip(prompts, generations))]
    result = {"max_param_diff": max_diff, "gap": logprob_gap(engine_lp, actor_rows), "buckets": stats.buckets,
              "tensors": stats.tensors, "expected_tensors": len(expected.names())}
    with open(f"{out}.rank{state.rank}.json", "w") as handle:
        json.dump(result, handle)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
