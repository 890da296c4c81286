"""``remix-megatron smoke``: the trainer's iteration on a synthetic batch, at any TP x PP x DP layout.

Builds the four policies (``policies.build_models``: from ``--init-from`` full weights, else
``model.hf_path``, else seeded random ones), or resumes them from the newest checkpoint, and runs
iterations up to ``trainer.num_steps``. Each takes this DP rank's share of a seeded synthetic
rollout (``rollout.synthetic``: behaviour log-probs and values recomputed by the current actor
and critic, perturbed by age) through the trainer's own steps after sampling: the reincarnation
check, ``TrainingBatch.pack``, ``updates.prepare`` (pi_k / ref / prev log-probs and values, drift,
prev <- pi_k, advantages, micro-batches) and ``updates.learn`` (the UTD passes through Megatron's
schedules); checkpoints hold ``Models.named()`` as the trainer's do. No generation, store or task
rewards: it checks that the parallel pieces run, and (``--dump``) gives the multi-process tests
what they compare across layouts and resumes.

``dump_dir`` receives safetensors/JSON: ``outputs`` (the first iteration's per-token forwards,
``[B, seq_length]`` in the global batch's order whatever the layout), ``grads_{actor,critic}``
(full gradients of the first optimizer step), ``init``/``final`` (full actor and critic weights
before and after training) and ``moments`` (Adam's, not with the distributed optimizer), one file
per pipeline stage; ``metrics.json`` (the first iteration's metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from remix_megatron.algorithms import needs_critic, phase
from remix_megatron.batching import PolicyForwards, TrainingBatch
from remix_megatron.checkpoint import latest_iteration, load_checkpoint, save_checkpoint
from remix_megatron.config import ExperimentConfig
from remix_megatron.models import iter_full_tensors, param_grad
from remix_megatron.parallel import ParallelState, init_parallel, world_size_from_env
from remix_megatron.policies import Models, build_models, copy_weights
from remix_megatron.rollout.synthetic import SyntheticRollout
from remix_megatron.updates import learn, prepare
from remix_megatron.validation import validate


def run_smoke(cfg: ExperimentConfig, *, dump_dir: str | None = None, init_from: str | None = None) -> dict:
    """Build (or resume), run iterations up to ``num_steps``, checkpoint, print a summary."""
    start = time.perf_counter()
    validate(cfg, world_size_from_env(), training=False)
    rollout = SyntheticRollout.make(cfg)
    state = init_parallel(cfg)
    models = build_models(cfg, state, with_critic=needs_critic(cfg.algorithm.advantage_estimator),
                          init_from=init_from)
    dump = Path(dump_dir) if dump_dir else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    checkpoints, counters, first = cfg.trainer.checkpoint_root, {}, 1
    if cfg.trainer.resume and latest_iteration(checkpoints) is not None:
        payload = load_checkpoint(checkpoints, models.named(), state)
        first = payload["iteration"] + 1
        counters["actor_lr_scale"] = payload["trainer_state"].get("actor_lr_scale", 1.0)
        if state.rank == 0:
            print(f"resumed from {checkpoints} at iteration {payload['iteration']} "
                  f"(saved at {payload['layout']})", flush=True)
    _save_stage_tensors(dump, "init", models.trained(), state, what="params")
    build_s = time.perf_counter() - start

    history, save_s, step_start = [], 0.0, time.perf_counter()
    for k in range(first, cfg.trainer.num_steps + 1):
        record = _iteration(k, rollout, models, cfg, state, counters, dump if k == first else None)
        history.append(record)
        if state.rank == 0:
            a, c = record["actor"], record["critic"]
            print(f"step {k}: actor pg_loss {a['pg_loss']:+.5f} clip_frac {a['clip_frac']:.3f} "
                  f"ratio {a['ratio_mean']:.4f} (max {a['ratio_max']:.3f}) kl_ref {a['kl_ref']:.2e} "
                  f"entropy {a['entropy']:.3f} | critic value_loss {c.get('value_loss', float('nan')):.5f}",
                  flush=True)
        interval = cfg.trainer.save_interval
        if interval >= 0 and (k == cfg.trainer.num_steps or (interval and k % interval == 0)):
            save_start = time.perf_counter()
            path = save_checkpoint(checkpoints, k, models.named(), state,
                                   {"smoke_step": k, "actor_lr_scale": counters.get("actor_lr_scale", 1.0)},
                                   config=cfg, keep_last=cfg.trainer.keep_checkpoints)
            save_s += time.perf_counter() - save_start
            if state.rank == 0:
                print(f"checkpoint saved: {path} ({time.perf_counter() - save_start:.1f} s)", flush=True)
    steps_run = max(cfg.trainer.num_steps - first + 1, 0)
    train_s = time.perf_counter() - step_start - save_s
    if dump is not None and state.rank == 0 and history:
        (dump / "metrics.json").write_text(json.dumps(history[0], indent=1))
    _save_stage_tensors(dump, "final", models.trained(), state, what="params")
    if dump is not None and not cfg.parallel.use_distributed_optimizer:
        _save_stage_tensors(dump, "moments", models.trained(), state, what="moments")
    counts = _count_parameters(models, state)
    summary = {"layout": f"TP{state.tensor_parallel} x PP{state.pipeline_parallel} x DP{state.data_parallel}",
               "world_size": state.world_size, "backend": state.runtime.backend,
               "device": state.runtime.device.type, "dtype": str(state.runtime.params_dtype),
               "actor_params": counts["actor"], "critic_params": counts.get("critic", 0), "steps": steps_run,
               "build_s": round(build_s, 2), "train_s_per_step": round(train_s / max(steps_run, 1), 3)}
    if state.rank == 0:
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    summary["history"] = history
    return summary


def _iteration(k: int, rollout: SyntheticRollout, models: Models, cfg: ExperimentConfig, state: ParallelState,
               counters: dict, dump: Path | None) -> dict:
    """The trainer's iteration k after its rollout, on this rank's share of the synthetic batch
    (``dump``: write its forwards and first gradients there)."""
    current = phase(k, cfg.algorithm)
    if current.reset_reference:  # policy reincarnation: the reference becomes pi_T
        copy_weights(models.actor.unwrapped(), models.ref)
    rows = rollout.share(state)
    trajectories, ages = rollout.collect(
        k, rows, actor=models.actor.chunks, critic=models.critic.chunks if models.critic is not None else None,
        micro_batch_size=cfg.trainer.micro_batch_size, seq_length=cfg.trainer.seq_length, state=state)
    batch = TrainingBatch.pack(k, trajectories, ages, seed=cfg.trainer.seed,
                               micro_batch_size=cfg.trainer.micro_batch_size,
                               global_batch_size=cfg.trainer.global_batch_size, seq_length=cfg.trainer.seq_length,
                               state=state)
    prepared = prepare(k, batch, models, cfg, state)
    if dump is not None:
        # pack shuffles the rows: row i holds the share's record at this global index (pack keeps the objects)
        where = {id(record): g for g, record in zip(rows, trajectories)}
        _save_outputs(dump, batch, prepared.forwards, [where[id(r)] for r in batch.records[:batch.real]], cfg, state)
    learned = learn(k, prepared, batch, models, cfg, state, counters, utd=current.utd,
                    after_backward=None if dump is None else _first_gradients(dump, models, state))
    return {"step": k, "kl_lambda": learned.kl_lambda, "actor": learned.actor, "critic": learned.critic,
            "drift": prepared.drift}


def _first_gradients(dump: Path, models: Models, state: ParallelState):
    """``learn``'s hook that writes each model's gradients of its first optimizer step."""
    def save(name: str, index: int) -> None:
        if index == 0:
            _save_stage_tensors(dump, f"grads_{name}", {name: models.trained()[name]}, state, what="grads")
    return save


def _save_outputs(dump: Path, batch: TrainingBatch, forwards: PolicyForwards, where: list[int],
                  cfg: ExperimentConfig, state: ParallelState) -> None:
    """The batch's forwards and behaviour log-probs, ``[B, seq_length]``: row ``where[i]`` of the global
    batch is this rank's row i (collective over DP: every global row comes from the one rank holding it)."""
    from safetensors.torch import save_file

    named = {"pik": forwards.pik, "ref": forwards.ref, "prev": forwards.prev, "behaviour": batch.rows.behaviour,
             "values": forwards.values}
    named = {name: tensor for name, tensor in named.items() if tensor is not None}  # passes not run: absent
    out = {}
    for name, local in named.items():
        full = torch.zeros(cfg.trainer.global_batch_size, cfg.trainer.seq_length)
        full[where, : local.size(1)] = local[: len(where)].float().cpu()
        dist.all_reduce(full, group=state.dp_group)
        out[name] = full
    if state.rank == 0:
        save_file(out, str(dump / "outputs.safetensors"))


def _save_stage_tensors(dump_dir: Path | None, name: str, models: dict, state: ParallelState, *, what: str) -> None:
    """Write this stage's full params / grads / Adam moments of ``models`` by name (collective over
    TP; one rank writes; nothing without ``dump_dir``)."""
    from safetensors.torch import save_file

    if dump_dir is None:
        return
    tensors = {}
    for prefix, model in models.items():
        selectors = {"params": {"": None}, "grads": {"": param_grad},
                     "moments": {f"{key}.": (lambda key: lambda n, p: model.adam_moment(p, key))(key)
                                 for key in ("exp_avg", "exp_avg_sq")}}[what]
        for tag, select in selectors.items():
            kwargs = {"select": select} if select is not None else {}
            for key, tensor in iter_full_tensors(model.unwrapped(), state, **kwargs):
                tensors[f"{tag}{prefix}.{key}"] = tensor.detach().float().cpu().contiguous()
    if state.tp_rank == 0 and state.dp_rank == 0:
        save_file(tensors, str(dump_dir / f"{name}_stage{state.pp_rank}.safetensors"))


def _count_parameters(models: Models, state: ParallelState) -> dict[str, int]:
    """Parameters of each trained model over all TP/PP ranks (replicated ones counted once)."""
    counts = {}
    for prefix, model in models.trained().items():
        local = 0
        for chunk in model.unwrapped():
            for param in chunk.parameters():
                if getattr(param, "tensor_model_parallel", False) or state.tp_rank == 0:
                    local += param.numel()
        total = torch.tensor([local if state.dp_rank == 0 else 0], dtype=torch.long)
        dist.all_reduce(total)
        counts[prefix] = int(total.item())
    return counts
