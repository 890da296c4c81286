"""What every key of metrics.jsonl means (``remix-megatron metrics``), one line each.

``{a}`` stands for a sample age (iterations since generation; 0 = fresh) and ``{name}`` for an
evaluation set (``heldout`` or a benchmark). A test checks that a real run logs no key missing here.
"""

from __future__ import annotations

import re

_LOSS = "over every UTD pass and minibatch of the iteration"
GLOSSARY: dict[str, str] = {
    "iteration": "training iteration k (0 = the evaluation before training)",
    "rollouts_total": "responses generated so far, this iteration included (the paper's cost axis)",
    "rollouts": "fresh responses generated this iteration (all DP ranks)",
    "fresh_groups": "fresh prompt groups in this iteration's batch",
    "replayed_groups": "prompt groups replayed from the store (iterations k-N .. k-1)",
    "off_policy_portion": "p of this iteration: share of the batch replayed (0 after reincarnation)",
    "utd": "update-to-data ratio of this iteration: passes over the mixed batch",
    "kl_lambda": "lambda(t) of KL-convex: weight of the KL to the reference (1 - lambda: to the precedent)",
    "reincarnated": "whether the run is past the reincarnation step T (on-policy phase)",
    "reward_mean": "mean reward of the fresh responses (math: fraction correct)",
    "response_length": "mean length of the fresh responses in tokens",
    "self_reflection_rate": "share of fresh responses with a self-reflection word (wait, verify, ...)",
    "truncated_rate": "share of fresh responses cut at the length budget",
    "engine_logprob_gap": "mean |engine - actor| log-prob on this iteration's responses (weight-sync check)",
    "mismatch/logprob_gap_mean": "mean |trainer behaviour - engine sampling| log-prob on the fresh tokens",
    "mismatch/logprob_gap_max": "largest |trainer behaviour - engine sampling| log-prob on the fresh tokens",
    "mismatch/kl_engine_trainer": "KL(engine || trainer) per fresh token (k3 estimate; the engine sampled them)",
    "actor/mismatch_weight_mean": "mean engine/trainer mismatch weight on the loss (algorithm.mismatch_correction)",
    "actor/mismatch_weight_zero_frac": "share of tokens the mismatch correction (mis) masked out",
    "behaviour_recomputed": "1 if the actor recomputed the behaviour log-probs at collection, 0 if the single "
                            "on-policy pass took them from its own forward (trainer.reuse_training_forward)",
    "actor/lr": "actor learning rate of this iteration",
    "actor/pg_loss": f"policy-gradient loss (Mix-PPG / PPO clip), token mean {_LOSS}",
    "actor/clip_frac": "share of tokens whose ratio the policy loss clipped",
    "actor/ratio_mean": "mean importance ratio pi_theta / behaviour over the batch's tokens",
    "actor/ratio_max": "largest importance ratio pi_theta / behaviour",
    "actor/ratio_mean/age{a}": "mean importance ratio on tokens of samples of age {a}",
    "actor/ratio_max/age{a}": "largest importance ratio on tokens of samples of age {a}",
    "actor/clip_centre_mean": "mean centre of the clip window (Mix-PPG: pi_k / behaviour; PPO: 1)",
    "actor/entropy": "mean per-token entropy of the policy (nats)",
    "actor/kl_ref": "per-token KL estimate of the policy to the reference",
    "actor/kl_prev": "per-token KL estimate of the policy to the precedent policy pi_{k-1}",
    "actor/kl_lambda": "lambda(t) as the loss used it",
    "actor/advantage_mean": "mean advantage over valid tokens (about 0 when whitened)",
    "actor/advantage_max": "largest advantage",
    "actor/advantage_min": "smallest advantage",
    "actor/response_length_mean": "mean response tokens per training row (replayed rows included)",
    "actor/grad_norm": "mean global gradient norm of the actor's optimizer steps (before clipping)",
    "actor/step_skipped": "actor optimizer steps skipped (non-finite gradients, or the no_update control)",
    "actor/optimizer_steps": "actor optimizer steps this iteration (minibatches x UTD)",
    "critic/value_loss": f"clipped value loss, token mean {_LOSS}",
    "critic/value_clip_frac": "share of tokens where the value clip was active",
    "critic/value_error": "mean squared error of the values against the returns",
    "critic/value_mean": "mean predicted value",
    "critic/return_mean": "mean return target (V-trace / GAE)",
    "critic/grad_norm": "mean global gradient norm of the critic's optimizer steps",
    "critic/step_skipped": "critic optimizer steps skipped",
    "critic/optimizer_steps": "critic optimizer steps this iteration",
    "time/sync_s": "seconds to wake the engine and sync the actor's weights into it",
    "time/generate_s": "seconds of generation, grading and behaviour log-probs",
    "time/store_s": "seconds writing and publishing the fresh trajectories",
    "time/logprobs_s": "seconds for pi_k / reference / precedent log-probs, values and advantages",
    "time/update_s": "seconds of actor and critic updates",
    "time/iteration_s": "seconds of the whole iteration (evaluation and checkpoint excluded)",
    "eval_accuracy": "held-out greedy accuracy (data.eval_path, data.eval_size problems)",
    "eval/average": "mean of the benchmark scores",
    "eval/{name}": "score of benchmark {name} (pass@1 or avg@k by its protocol)",
    "eval/{name}/format_rate": "share of {name} responses with one paired <think> and a \\boxed answer",
    "eval/{name}/self_reflection_rate": "share of {name} responses with a self-reflection word",
    "eval/{name}/mean_response_length": "mean response length on {name} in tokens",
    "drift/kl_prev_fresh": "KL of the precedent policy to the behaviour policy on fresh tokens",
    "drift/tv_prev_fresh": "total-variation distance of the precedent to the behaviour policy on fresh tokens",
    "drift/abs_w_minus_1/age{a}": "mean |w - 1| of the importance ratio on samples of age {a}",
    "drift/outside_window/age{a}": "share of tokens of age {a} whose ratio lies outside the clip window",
    "drift/malformed_rate": "share of fresh responses that are malformed (no parseable answer)",
}


def _pattern(key: str) -> re.Pattern:
    escaped = re.escape(key).replace(r"\{a\}", r"\d+").replace(r"\{name\}", r"[^/]+")
    return re.compile(f"^{escaped}$")


_PATTERNS = [(_pattern(key), key) for key in GLOSSARY]


def entry(key: str) -> str | None:
    """The glossary key (possibly a pattern like ``actor/ratio_mean/age{a}``) that explains ``key``."""
    exact = key if key in GLOSSARY else None
    return exact or next((name for pattern, name in _PATTERNS if pattern.match(key)), None)


def format_glossary() -> str:
    width = max(map(len, GLOSSARY))
    return "\n".join(f"{key:<{width}}  {text}" for key, text in GLOSSARY.items())
