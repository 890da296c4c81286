"""RL loop throughput on the tiny task: seconds per 1k rollouts and where a step's time goes.

Runs a few ReMix-PPO iterations of ``configs/tiny_remix_ppo.yaml`` in this process (TP1) with
``--prompts`` rollouts per step, then reports seconds per 1,000 rollouts (first iteration
excluded as warm-up) and each phase's share of the step: weight sync, generation (with
grading and the behaviour log-prob / value pass), store write + publish, pi_k/ref/prev
log-probs + advantages, and the UTD updates. Targets (issue 8): <= 4 s per 1k rollouts at
~13-token completions and 256 rollouts per step; <= 5% of a step outside generation,
grading and model forward/backward (here: sync + store).

    .venv/bin/python benchmarks/rl_throughput.py [--prompts 256 --iterations 4]
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()

    from remix_megatron.config import load_config
    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.parallel import destroy_parallel
    from remix_megatron.trainer import train

    tiny = build_tiny_model()
    run = tempfile.mkdtemp(prefix="rl-bench-")
    cfg = load_config("configs/tiny_remix_ppo.yaml", [
        f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl", "data.eval_interval=0",
        f"rollout.prompts_per_step={args.prompts}", f"trainer.num_steps={args.iterations}",
        "trainer.save_interval=-1", f"trainer.run_dir={run}", "trainer.micro_batch_size=32"])
    history = [r for r in train(cfg) if r["iteration"] > 1]  # the first iteration has nothing to replay
    destroy_parallel()
    total = sum(r["time/iteration_s"] for r in history)
    rollouts = sum(r["rollouts"] for r in history)
    tokens = sum(r["rollouts"] * r["response_length"] for r in history)
    print(f"{len(history)} iterations, {rollouts} rollouts of {tokens / rollouts:.1f} tokens on average")
    print(f"  seconds per 1k rollouts: {1000 * total / rollouts:.1f} (target <= 4 at ~13-token completions)")
    for phase in ("sync", "generate", "store", "logprobs", "update"):
        share = sum(r[f"time/{phase}_s"] for r in history) / total
        print(f"  {phase:9s} {100 * share:5.1f}% of the step")
    outside = sum(r["time/sync_s"] + r["time/store_s"] for r in history) / total
    print(f"  outside generation, grading and forward/backward (sync + store): {100 * outside:.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
