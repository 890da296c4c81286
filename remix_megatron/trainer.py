"""The ReMix training loop: one iteration reads like the paper's algorithm.

    for k = 1, 2, ...:
        phase(k)                      -> off-policy portion p, UTD, reincarnation (ref <- pi_k)
        rollout(k)                    -> fresh responses of pi_k on the colocated engine, rewards,
                                         behaviour log-probs and values, written to the store
        mixed batch(k)                -> (1-p)B fresh + pB replayed from k-N..k-1, packed once
        pi_k / ref / prev log-probs, values; prev <- pi_k; advantages (V-trace GAE | GAE | GRPO)
        UTD passes of actor and critic updates through Megatron's schedules
        metrics, evaluation, checkpoint

Algorithms (ppo, grpo, remix_ppo, remix_grpo) are configs of this one loop. The pieces live in
their modules: policies (the four models), rollout.collect, store, batching (the packed batch,
its forwards and advantages), updates (``prepare``: forwards and loss inputs; ``learn``: the
optimizer steps), evaluation.in_training. ``remix-megatron smoke`` runs the same steps after the
rollout on a synthetic batch (smoke.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from remix_megatron.algorithms import evaluation_due, needs_critic, phase
from remix_megatron.batching import TrainingBatch, single_on_policy_pass
from remix_megatron.checkpoint import load_checkpoint, save_checkpoint
from remix_megatron.config import ConfigError, ExperimentConfig, config_to_dict, save_config
from remix_megatron.console import iteration_line, say
from remix_megatron.convert.export import export_hf
from remix_megatron.data import PromptSource, load_records, load_tokenizer
from remix_megatron.evaluation import config_benchmarks
from remix_megatron.evaluation.in_training import evaluate_during_training
from remix_megatron.faults import fault_point
from remix_megatron.metrics_log import RunLog
from remix_megatron.parallel import ParallelState, init_parallel, world_size_from_env
from remix_megatron.policies import Models, build_models, copy_weights
from remix_megatron.rewards import REWARDS
from remix_megatron.rollout import get_engine_factory
from remix_megatron.rollout.collect import collect, rollout_stats
from remix_megatron.rollout.weight_sync import check_logprob_gap, sync_weights
from remix_megatron.rundir import check_run_dir, finished_iteration, read_metrics, restore_run
from remix_megatron.stopping import StopRequest, TrainingStopped
from remix_megatron.store import MixedSampler, open_store
from remix_megatron.updates import learn, prepare
from remix_megatron.validation import validate


def _train_source(cfg: ExperimentConfig, tokenizer) -> PromptSource:
    try:
        return PromptSource(load_records(cfg.data.train_path), tokenizer, seed=cfg.trainer.seed, name="train",
                            template=cfg.data.template, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                            overlong=cfg.data.overlong, problem_key=cfg.data.problem_key,
                            answer_key=cfg.data.answer_key, id_key=cfg.data.id_key)
    except ValueError as error:  # the data file or template: one line naming it, not a traceback
        raise ConfigError(f"training data ({cfg.data.train_path}): {error}") from None


def _eval_line(record: dict) -> str:
    parts = [f"held-out {record['eval_accuracy']:.3f}"] if "eval_accuracy" in record else []
    parts += [f"{key[5:]} {value:.3f}" for key, value in record.items()
              if key.startswith("eval/") and key.count("/") == 1]
    return " | " + ", ".join(parts) if parts else ""


def train(cfg: ExperimentConfig) -> list[dict]:
    """Run ReMix (or PPO / GRPO, by config) up to ``trainer.num_steps`` iterations; returns the metrics."""
    checked = validate(cfg, world_size_from_env())  # every weight-free check, before anything heavy
    grader = REWARDS.get(cfg.data.reward)()
    state = init_parallel(cfg)
    if state.rank == 0:
        for warning in checked.warnings:
            print(f"warning: {warning}", flush=True)
    resume_from = check_run_dir(cfg, rank=state.rank, barrier=dist.barrier)
    if finished_iteration(cfg, resume_from):
        return _finished(cfg, state, resume_from)
    if state.rank == 0:
        save_config(cfg, Path(cfg.trainer.run_dir) / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.hf_path)
    train_source = _train_source(cfg, tokenizer)
    evaluations = config_benchmarks(cfg.data)
    say("start", f"building models: actor{', critic' if needs_critic(cfg.algorithm.advantage_estimator) else ''}"
        f", reference, precedent ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"TP{state.tensor_parallel} x PP{state.pipeline_parallel} x DP{state.data_parallel})", active=state.rank == 0)
    models = build_models(cfg, state, with_critic=needs_critic(cfg.algorithm.advantage_estimator))
    run_dir = Path(cfg.trainer.run_dir)
    store = _open_store(cfg, state)
    sampler = MixedSampler.from_config(cfg, groups_per_step=cfg.rollout.prompts_per_step)
    counters = {"rollouts": 0}
    first = 1 if resume_from is None else _resume(resume_from, models, train_source, counters, cfg, state) + 1
    # The store and metrics.jsonl match the checkpoint again (or are empty without one).
    history = _shared_history(restore_run(cfg, store, resume_from) if state.rank == 0 else [])
    say("start", f"starting the {cfg.rollout.engine} generation engine", active=state.rank == 0)
    engine = get_engine_factory(cfg.rollout.engine)(cfg.rollout, cfg.model, state, cfg.model.hf_path,
                                                     seed=cfg.trainer.seed)
    log = RunLog(run_dir, active=state.rank == 0, trainer=cfg.trainer, config=config_to_dict(cfg),
                 first_iteration=first)
    if evaluations and first == 1 and (cfg.data.eval_interval or cfg.data.eval_every_rollouts):
        history.append({"iteration": 0, "rollouts_total": 0,
                        **_evaluate(0, evaluations, engine, tokenizer, grader, cfg, state, models)})
        log.write(history[-1])
        if state.rank == 0:
            print(f"[0/{cfg.trainer.num_steps}] before training: {_eval_line(history[-1])[3:]}", flush=True)
    stop, stopped = StopRequest(), None
    with stop:
        for k in range(first, cfg.trainer.num_steps + 1):
            record = _iteration(k, cfg, state, models, engine, tokenizer, grader, train_source, store, sampler,
                                counters)
            stopped = stop.agreed()
            if evaluations and not stopped and evaluation_due(
                    k, cfg.trainer.num_steps, record["rollouts_total"] - record["rollouts"], record["rollouts_total"],
                    every_steps=cfg.data.eval_interval, every_rollouts=cfg.data.eval_every_rollouts):
                record.update(_evaluate(k, evaluations, engine, tokenizer, grader, cfg, state, models))
            _report(k, record, cfg, state, history, log)  # before the checkpoint: a resume finds every record
            fault_point("metrics_written", k)
            interval = cfg.trainer.save_interval
            if interval >= 0 and (k == cfg.trainer.num_steps or (interval and k % interval == 0) or stopped):
                _save(k, record, models, train_source, counters, cfg, state)
            if stopped:
                break
    engine.shutdown()
    for path in log.close(history):
        print(f"plot: {path}", flush=True)
    if stopped:
        raise TrainingStopped(stopped, k, checkpointed=cfg.trainer.save_interval >= 0)
    export_hf(models.actor.unwrapped(), state, cfg.model, run_dir / "hf_actor", source_hf_dir=cfg.model.hf_path)
    if state.rank == 0:
        print(f"final actor exported to {run_dir / 'hf_actor'}", flush=True)
    return history


def _open_store(cfg: ExperimentConfig, state: ParallelState):
    """Rank 0 creates (and cleans) the trajectory store, then every rank opens it."""
    path, options = cfg.store.path or Path(cfg.trainer.run_dir) / "store", dict(
        row_group_size=cfg.store.row_group_size, compression=cfg.store.compression)
    store = open_store(path, create=True, extra_columns=["grpo_advantage"], cleanup=True,
                       **options) if state.rank == 0 else None
    dist.barrier()
    return store or open_store(path, **options)


def _resume(iteration: int, models: Models, train_source: PromptSource, counters: dict, cfg: ExperimentConfig,
            state: ParallelState) -> int:
    """Load the checkpoint of ``iteration`` (models, prompt order, counters); returns its iteration."""
    checkpoints = cfg.trainer.checkpoint_root
    payload = load_checkpoint(checkpoints, models.named(), state, iteration=iteration)
    say("event", f"resumed from iteration {payload['iteration']} ({checkpoints})", active=state.rank == 0)
    saved = payload["trainer_state"]
    train_source.load_state_dict(saved["prompts"])
    counters["rollouts"] = saved["rollouts"]
    counters["actor_lr_scale"] = saved.get("actor_lr_scale", 1.0)
    return payload["iteration"]


def _save(k: int, record: dict, models: Models, train_source: PromptSource, counters: dict, cfg: ExperimentConfig,
          state: ParallelState) -> None:
    saved_to = save_checkpoint(cfg.trainer.checkpoint_root, k, models.named(), state,
                               {"prompts": train_source.state_dict(), "rollouts": counters["rollouts"],
                                "reincarnated": record["reincarnated"],
                                "actor_lr_scale": counters.get("actor_lr_scale", 1.0)}, config=cfg,
                               keep_last=cfg.trainer.keep_checkpoints)
    fault_point("checkpoint_saved", k)
    say("event", f"checkpoint of iteration {k} saved: {saved_to}", active=state.rank == 0)


def _shared_history(records: list[dict]) -> list[dict]:
    """Rank 0's metrics records (read from metrics.jsonl) on every rank."""
    shared = [records]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _finished(cfg: ExperimentConfig, state: ParallelState, iteration: int) -> list[dict]:
    """A rerun of a finished run: say so and return its metrics, without building or exporting anything."""
    history = _shared_history(read_metrics(Path(cfg.trainer.run_dir) / "metrics.jsonl") if state.rank == 0 else [])
    if state.rank == 0:
        print(f"{cfg.trainer.run_dir} is finished: checkpoint of iteration {iteration} (trainer.num_steps="
              f"{cfg.trainer.num_steps}), actor exported to {Path(cfg.trainer.run_dir) / 'hf_actor'}. Nothing to do; "
              "raise trainer.num_steps to continue it", flush=True)
    return history


def _report(k: int, record: dict, cfg: ExperimentConfig, state: ParallelState, history: list, log: RunLog) -> None:
    """Keep, log and print one iteration's metrics (``trainer.console_metrics``), and its events."""
    history.append(record)
    log.write(record)
    if state.rank == 0:
        if k == cfg.algorithm.reincarnation_step + 1 and cfg.algorithm.reincarnation_step:
            say("event", f"policy reincarnation after step {k - 1}: the reference is now that policy; on-policy "
                         f"from iteration {k} (UTD {record['utd']})")
        print(iteration_line(k, cfg.trainer.num_steps, record, cfg.trainer.console_metrics) + _eval_line(record),
              flush=True)


def _sync(engine, models: Models, cfg: ExperimentConfig, state: ParallelState) -> None:
    """Wake-time weight sync: the actor's current weights into the engine."""
    sync_weights(engine, models.actor.unwrapped(), state, cfg.model,
                 bucket_bytes=cfg.rollout.weight_sync_bucket_mb << 20)


def _evaluate(k: int, evaluations, engine, tokenizer, grader, cfg: ExperimentConfig, state: ParallelState,
              models: Models) -> dict[str, float]:
    return evaluate_during_training(k, evaluations, engine, lambda: _sync(engine, models, cfg, state), tokenizer,
                                    grader, cfg, state)


class _Laps:
    """Wall time of each phase of an iteration, as ``time/{name}_s`` metrics."""

    def __init__(self) -> None:
        self.times, self._last = {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{name}_s"], self._last = now - self._last, now


def _iteration(k: int, cfg: ExperimentConfig, state: ParallelState, models: Models, engine, tokenizer, grader,
               train_source, store, sampler: MixedSampler, counters: dict) -> dict:
    """One ReMix iteration; returns its metrics."""
    alg, lap = cfg.algorithm, _Laps()
    current = phase(k, alg)
    if current.reset_reference:  # policy reincarnation: the reference becomes pi_T
        copy_weights(models.actor.unwrapped(), models.ref)
    # rollout: pi_k generates on the woken engine; records go to the store
    engine.wake_up()
    _sync(engine, models, cfg, state)
    lap("sync")
    fresh = sampler.fresh_to_generate(store, k, current.off_policy_portion)
    interval = cfg.rollout.logprob_check_interval
    critic_chunks = models.critic.chunks if models.critic is not None else None
    check_gap = bool(interval) and k % interval == 0
    single = single_on_policy_pass(current, fresh * cfg.rollout.responses_per_prompt, cfg)
    result = collect(k, train_source.next_batch(fresh), cfg, state, engine, tokenizer, grader,
                     actor=models.actor.chunks, critic=critic_chunks, check_gap=check_gap, recompute=not single)
    engine.sleep()
    lap("generate")
    if result.logprob_gap is not None:
        check_logprob_gap(result.logprob_gap, cfg.rollout.logprob_check_threshold)
    _publish(k, result.records, store, cfg, state)
    lap("store")
    # the mixed batch, packed once; its forward passes; then prev takes pi_k for iteration k+1, and
    # the UTD passes of actor and critic updates on the fixed advantages and value targets
    sample = sampler.sample(store, k, current.off_policy_portion, dp_rank=state.dp_rank, dp_size=state.data_parallel)
    batch = TrainingBatch.pack(k, sample.trajectories, sample.ages, seed=cfg.trainer.seed,
                               micro_batch_size=cfg.trainer.micro_batch_size,
                               global_batch_size=cfg.trainer.global_batch_size, seq_length=cfg.trainer.seq_length,
                               state=state)
    prepared = prepare(k, batch, models, cfg, state)
    lap("logprobs")
    learned = learn(k, prepared, batch, models, cfg, state, counters, utd=current.utd,
                    behaviour_from_forward=not result.recomputed)
    lap("update")
    actor_metrics = learned.actor
    gap = result.logprob_gap
    if not result.recomputed:  # the single pass's own forward against the engine, measured in its loss
        measured = actor_metrics.pop("engine_logprob_gap", None)  # never an actor/ metric
        gap = measured if check_gap else None
        if gap is not None:
            check_logprob_gap(gap, cfg.rollout.logprob_check_threshold)
    stats = rollout_stats(result, state)
    counters["rollouts"] += stats["rollouts"]
    record = {"iteration": k, "rollouts_total": counters["rollouts"], "reincarnated": current.reincarnated,
              "off_policy_portion": current.off_policy_portion, "utd": current.utd, "kl_lambda": learned.kl_lambda,
              "actor/lr": models.actor.optimizer.param_groups[0]["lr"],
              "replayed_groups": sample.plan.num_replayed, "fresh_groups": sample.plan.num_fresh, **stats,
              **{f"actor/{key}": value for key, value in actor_metrics.items()},
              **{f"critic/{key}": value for key, value in learned.critic.items()}, **prepared.drift, **lap.times}
    record["behaviour_recomputed"] = float(result.recomputed)
    if gap is not None:
        record["engine_logprob_gap"] = gap
    record["time/iteration_s"] = sum(lap.times.values())
    return record


def _publish(k: int, records: list, store, cfg: ExperimentConfig, state: ParallelState) -> None:
    """Each DP rank's first TP/PP rank writes its shard; rank 0 publishes the iteration (and prunes)."""
    if state.tp_rank == 0 and state.pp_rank == 0:
        store.write_shard(k, state.dp_rank, records)
    dist.barrier()
    if state.rank == 0:
        store.publish(k, num_writers=state.data_parallel)
        if cfg.store.keep_iterations:
            store.prune(cfg.store.keep_iterations)
    dist.barrier()


