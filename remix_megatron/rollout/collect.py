"""One iteration's rollout: pi_k's responses on the colocated engine, their rewards, the actor's
recomputed behaviour log-probs (and the critic's values), as store records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.algorithms.advantages import grpo_advantages
from remix_megatron.algorithms.drift import malformed
from remix_megatron.algorithms.mismatch import mismatch_sums
from remix_megatron.batching import recompute_behaviour, response_spans
from remix_megatron.config import ExperimentConfig
from remix_megatron.evaluation import self_reflection
from remix_megatron.parallel import ParallelState
from remix_megatron.rollout.engine import SamplingParams
from remix_megatron.rollout.weight_sync import logprob_gap
from remix_megatron.store import Trajectory


@dataclass
class RolloutResult:
    records: list[Trajectory]  # this DP rank's fresh trajectories
    texts: list[str]
    logprob_gap: float | None
    recomputed: bool = True  # behaviour log-probs recomputed by the actor (else: the engine's)


def response_budget(prompts, cfg: ExperimentConfig) -> int:
    """New tokens that fit beside the longest prompt in a ``trainer.seq_length + 1`` sequence."""
    longest = max(len(p.token_ids) for p in prompts)
    return max(1, min(cfg.rollout.max_new_tokens, cfg.trainer.seq_length + 1 - longest))


def collect(k: int, prompts, cfg: ExperimentConfig, state: ParallelState, engine, tokenizer, grader, *,
            actor, critic, check_gap: bool, recompute: bool = True) -> RolloutResult:
    """Generate this DP rank's share of ``prompts`` with pi_k (``actor``/``critic``: model chunks),
    score, recompute, build records (with each response's GRPO advantage in its own group).

    ``recompute=False`` (a single on-policy pass, where the training forward itself gives pi_k's
    log-probs, see ``trainer``): no actor pass; the records carry the engine's sampling
    log-probs as behaviour, when the engine gives them (else the actor recomputes them anyway)."""
    mine = [(index, prompt) for index, prompt in enumerate(prompts) if index % state.data_parallel == state.dp_rank]
    if not mine:
        _every_rank_recomputes(False, cfg, state)
        return RolloutResult(records=[], texts=[], logprob_gap=None)
    params = SamplingParams(n=cfg.rollout.responses_per_prompt, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=response_budget([p for _, p in mine], cfg),
                            stop_token_ids=(tokenizer.eos_token_id,),
                            seed=cfg.trainer.seed * 1_000_003 + k * 1009 + state.dp_rank)
    generations = engine.generate([p.token_ids.tolist() for _, p in mine], params)
    flat = [(index, prompt, g) for (index, prompt), gs in zip(mine, generations) for g in gs]
    texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for _, _, g in flat]
    scores, _ = grader(texts, [prompt.answer for _, prompt, _ in flat])
    if cfg.trainer.control == "shuffled_rewards":  # a control: rewards no longer follow the responses
        order = np.random.default_rng([cfg.trainer.seed, k, state.dp_rank]).permutation(len(scores))
        scores = [scores[i] for i in order]
    drafts = [Trajectory(iteration=k, prompt_id=prompt.id, group_id=index, prompt_tokens=prompt.token_ids,
                         response_tokens=g.token_ids, reward=score, behaviour_logprobs=np.zeros(len(g.token_ids)),
                         finish_reason=g.finish_reason, extra={"grpo_advantage": 0.0})
              for (index, prompt, g), score in zip(flat, scores)]
    recompute = recompute or critic is not None or any(g.logprobs is None for _, _, g in flat)
    balance = _every_rank_recomputes(recompute, cfg, state)
    if recompute:
        behaviour, values = recompute_behaviour(drafts, actor=actor, critic=critic,
                                                micro_batch_size=cfg.trainer.micro_batch_size,
                                                seq_length=cfg.trainer.seq_length, state=state,
                                                max_tokens=cfg.trainer.max_tokens_per_micro_batch,
                                                packed=cfg.trainer.packed_sequences, balance=balance)
    else:
        spans = response_spans(drafts, cfg.trainer.seq_length)
        behaviour = [g.logprobs[: span.stop - span.start] for (_, _, g), span in zip(flat, spans)]
        values = None
    group_advantage = grpo_advantages(torch.tensor([d.reward for d in drafts]),
                                      torch.tensor([d.group_id for d in drafts]),
                                      torch.ones(len(drafts), 1), norm_std=cfg.algorithm.grpo_norm_std,
                                      eps=cfg.algorithm.grpo_eps)[:, 0].tolist()
    records = []
    for draft, lp, value, advantage, (_, _, g) in zip(drafts, behaviour, values or [None] * len(drafts),
                                                      group_advantage, flat):
        kept = lp.size  # responses longer than the sequence budget are cut (counted as 'length')
        records.append(Trajectory(
            iteration=k, prompt_id=draft.prompt_id, group_id=draft.group_id, prompt_tokens=draft.prompt_tokens,
            response_tokens=draft.response_tokens[:kept], reward=draft.reward, behaviour_logprobs=lp,
            finish_reason=draft.finish_reason if kept == draft.response_length else "length", values=value,
            extra={"grpo_advantage": float(advantage)},
            engine_logprobs=None if g.logprobs is None else g.logprobs[:kept]))
    gap = None
    if check_gap and recompute:  # else the training forward measures it (trainer)
        engine_lp = [g.logprobs[: r.response_length] for (_, _, g), r in zip(flat, records) if g.logprobs is not None]
        gap = logprob_gap(engine_lp, [r.behaviour_logprobs for r in records][: len(engine_lp)])
    return RolloutResult(records=records, texts=texts, logprob_gap=gap, recomputed=recompute)


def _every_rank_recomputes(recompute: bool, cfg: ExperimentConfig, state: ParallelState) -> bool:
    """Whether the behaviour recompute is balanced over the DP ranks this iteration: with
    ``trainer.balance_data_parallel`` under a token budget, when every DP rank recomputes (a rank
    without prompts, or whose engine gave log-probs, does not). Every rank calls it once per
    collection, so the ranks agree in one all-reduce."""
    if not (cfg.trainer.balance_data_parallel and cfg.trainer.max_tokens_per_micro_batch and state.data_parallel > 1):
        return False
    agreed = torch.tensor([1 if recompute else 0], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=state.dp_group)
    return bool(agreed.item())


def rollout_stats(result: RolloutResult, state: ParallelState) -> dict[str, float]:
    """The iteration's rollout metrics over every DP rank."""
    records = result.records
    local = torch.tensor([len(records), sum(r.reward for r in records), sum(r.response_length for r in records),
                          sum(self_reflection(t) for t in result.texts),
                          sum(r.finish_reason == "length" for r in records), sum(map(malformed, result.texts))],
                         dtype=torch.float64)
    dist.all_reduce(local, group=state.dp_group)
    count = local[0].clamp(min=1)
    stats = {"rollouts": int(local[0].item()), "reward_mean": (local[1] / count).item(),
             "response_length": (local[2] / count).item(), "self_reflection_rate": (local[3] / count).item(),
             "truncated_rate": (local[4] / count).item(), "drift/malformed_rate": (local[5] / count).item()}
    return {**stats, **_mismatch_stats(records, state)}


def _mismatch_stats(records: list[Trajectory], state: ParallelState) -> dict[str, float]:
    """mismatch/*: the engine's sampling log-probs against the trainer's behaviour ones on this
    iteration's fresh tokens, over every DP rank (absent when the engine gives none)."""
    have = torch.tensor([sum(r.engine_logprobs is not None for r in records), len(records)], dtype=torch.int64)
    dist.all_reduce(have, group=state.dp_group)
    if int(have[0]) == 0 or int(have[0]) != int(have[1]):
        return {}
    behaviour = torch.from_numpy(np.concatenate([r.behaviour_logprobs for r in records] or [np.zeros(0, np.float32)]))
    engine = torch.from_numpy(np.concatenate([r.engine_logprobs for r in records] or [np.zeros(0, np.float32)]))
    sums = mismatch_sums(behaviour.double(), engine.double(), torch.ones_like(behaviour, dtype=torch.float64))
    peak = sums[2:3].clone()
    dist.all_reduce(sums, group=state.dp_group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=state.dp_group)
    tokens = sums[0].clamp(min=1)
    return {"mismatch/logprob_gap_mean": (sums[1] / tokens).item(), "mismatch/logprob_gap_max": peak.item(),
            "mismatch/kl_engine_trainer": (sums[3] / tokens).item()}
