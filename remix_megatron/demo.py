"""The smallest real thing the package does end to end, until the RL trainer lands.

Builds the actor and the critic from a config at its TP x PP x DP layout (or resumes them
from the newest checkpoint) and runs ReMix iterations up to ``trainer.num_steps``: each
recomputes pi_k log-probs and values with real forward passes and updates both through Megatron's pipeline schedules, on one
seeded synthetic batch that stands in for a rollout: random token sequences with responses
of varied lengths, 0/1 outcome rewards on their last token, and samples of every age in the
replay window whose behaviour log-probs are the current policy's, perturbed more the older
the sample. Advantages are the configured estimator's (V-trace GAE by default); the actor
loss is the configured one (Mix-PPG + entropy + KL-convex); the critic's is the clipped
value loss. Checkpoints are saved every ``trainer.save_interval`` iterations and at the end.
It exercises every piece built so far; it is not RL (no generation, no task rewards).

``dump_dir`` writes, as safetensors/JSON, what the multi-process tests compare across
layouts: per-token log-probs/entropies/values, full (TP-gathered) gradients of the first
step, full parameters before and after training (one file per pipeline stage) and the
first step's loss metrics.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from remix_megatron.algorithms import ADVANTAGE_ESTIMATORS, ActorLossInputs, AdvantageInputs, kl_lambda, phase
from remix_megatron.algorithms.megatron_adapter import (
    CriticTargets,
    MicroBatch,
    actor_loss_builder,
    critic_loss_builder,
    forward_logprobs,
    forward_values,
    reduce_metrics,
    run_pipeline,
    split_micro_batches,
)
from remix_megatron.checkpoint import latest_iteration, load_checkpoint, save_checkpoint
from remix_megatron.config import ExperimentConfig
from remix_megatron.convert.export import load_hf_into
from remix_megatron.models import (
    build_actor,
    build_critic,
    iter_full_tensors,
    load_full_state_dict,
    make_trainable,
    param_grad,
)
from remix_megatron.parallel import ParallelState, init_parallel, world_size_from_env
from remix_megatron.validation import validate

PROMPT_TOKENS = 4


@dataclass(frozen=True)
class SyntheticRollout:
    """A global batch standing in for collected trajectories, identical on every rank."""

    tokens: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]
    loss_mask: torch.Tensor  # [B, S] response tokens
    rewards: torch.Tensor  # [B, S] outcome on the last response token
    sample_age: torch.Tensor  # [B] iterations since generation
    noise: torch.Tensor  # [3, B, S] perturbations for behaviour / reference / precedent log-probs

    @staticmethod
    def make(cfg: ExperimentConfig) -> "SyntheticRollout":
        gen = torch.Generator().manual_seed(cfg.trainer.seed)
        batch, seq = cfg.trainer.global_batch_size, cfg.trainer.seq_length
        sequence = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=gen)
        lengths = torch.randint(1, seq - PROMPT_TOKENS + 1, (batch,), generator=gen)
        positions = torch.arange(seq)
        loss_mask = ((positions >= PROMPT_TOKENS) & (positions < PROMPT_TOKENS + lengths[:, None])).float()
        rewards = torch.zeros(batch, seq)
        rewards[torch.arange(batch), PROMPT_TOKENS + lengths - 1] = torch.randint(0, 2, (batch,), generator=gen).float()
        return SyntheticRollout(tokens=sequence[:, :-1].contiguous(), labels=sequence[:, 1:].contiguous(),
                                loss_mask=loss_mask, rewards=rewards,
                                sample_age=torch.arange(batch) % (cfg.algorithm.replay_window + 1),
                                noise=torch.randn(3, batch, seq, generator=gen))

    def rows(self, state: ParallelState) -> slice:
        """This DP rank's contiguous share of the batch."""
        per_rank = self.tokens.size(0) // state.data_parallel
        return slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)


def _gather_rows(local: torch.Tensor, state: ParallelState) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(state.data_parallel)]
    dist.all_gather(parts, local.contiguous(), group=state.dp_group)
    return torch.cat(parts)


def _micro_batches(rollout: SyntheticRollout, rows: slice, size: int, actor: ActorLossInputs | None = None,
                   critic: CriticTargets | None = None) -> list[MicroBatch]:
    """Cut this rank's rows into micro-batches (``actor``/``critic`` hold this rank's rows)."""
    return split_micro_batches(rollout.tokens[rows], rollout.labels[rows], size, actor=actor, critic=critic)


def _prepare_losses(cfg: ExperimentConfig, rollout: SyntheticRollout, actor, critic, state: ParallelState):
    """pi_k log-probs and values from real forward passes, then advantages over the global batch."""
    rows = rollout.rows(state)
    plain = _micro_batches(rollout, rows, cfg.trainer.micro_batch_size)
    pik_local, entropy_local = forward_logprobs(actor.chunks, plain, state)
    values_local = forward_values(critic.chunks, plain, state)
    pik, entropy, values = (_gather_rows(t.cpu(), state) for t in (pik_local, entropy_local, values_local))
    age = rollout.sample_age.float().unsqueeze(-1)
    behaviour = pik - 0.05 * age * rollout.noise[0].abs()  # older samples: further-off behaviour policies
    estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage_estimator)
    advantage = estimator(AdvantageInputs(
        rewards=rollout.rewards, mask=rollout.loss_mask, values=values, pik_logprobs=pik,
        behaviour_logprobs=behaviour, scores=rollout.rewards.sum(-1),
        group_ids=torch.arange(rollout.tokens.size(0)) // 2), cfg.algorithm)
    actor_inputs = ActorLossInputs(
        loss_mask=rollout.loss_mask[rows], advantages=advantage.advantages[rows],
        behaviour_logprobs=behaviour[rows], pik_logprobs=pik[rows],
        ref_logprobs=(pik + 0.02 * rollout.noise[1])[rows], prev_logprobs=(pik + 0.01 * rollout.noise[2])[rows],
        sample_age=rollout.sample_age[rows])
    actor_batches = _micro_batches(rollout, rows, cfg.trainer.micro_batch_size, actor=actor_inputs)
    critic_batches = None
    if advantage.returns is not None:
        targets = CriticTargets(loss_mask=rollout.loss_mask[rows], old_values=values[rows],
                                returns=advantage.returns[rows])
        critic_batches = _micro_batches(rollout, rows, cfg.trainer.micro_batch_size, critic=targets)
    return {"logprobs": pik, "entropy": entropy, "values": values}, actor_batches, critic_batches


def _save_stage_tensors(dump_dir: Path | None, name: str, models: dict, state: ParallelState, *, what: str) -> None:
    """Write this stage's full params / grads / Adam moments (collective over TP; one rank writes)."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, model in models.items():
        selectors = {"params": {"": None}, "grads": {"": param_grad},
                     "moments": {f"{key}.": (lambda key: lambda n, p: model.adam_moment(p, key))(key)
                                 for key in ("exp_avg", "exp_avg_sq")}}[what]
        for tag, select in selectors.items():
            kwargs = {"select": select} if select is not None else {}
            for key, tensor in iter_full_tensors(model.unwrapped(), state, **kwargs):
                tensors[f"{tag}{prefix}.{key}"] = tensor.detach().float().cpu().contiguous()
    if dump_dir is not None and state.tp_rank == 0 and state.dp_rank == 0:
        save_file(tensors, str(dump_dir / f"{name}_stage{state.pp_rank}.safetensors"))


def _load_initial_weights(path: Path, models: dict, state: ParallelState) -> None:
    from safetensors.torch import load_file

    full = load_file(str(path))
    for prefix, model in models.items():
        own = {key[len(prefix) + 1:]: value for key, value in full.items() if key.startswith(prefix + ".")}
        load_full_state_dict(model.unwrapped(), own, state)


def _count_parameters(models: dict, state: ParallelState) -> dict[str, int]:
    """Parameters of each model over all TP/PP ranks (replicated ones counted once)."""
    counts = {}
    for prefix, model in models.items():
        local = 0
        for chunk in model.unwrapped():
            for param in chunk.parameters():
                if getattr(param, "tensor_model_parallel", False) or state.tp_rank == 0:
                    local += param.numel()
        total = torch.tensor([local if state.dp_rank == 0 else 0], dtype=torch.long)
        dist.all_reduce(total)
        counts[prefix] = int(total.item())
    return counts


def _train_step(model, batches, builder, state, dump, name, dump_grads: bool) -> dict[str, float]:
    model.zero_grad()
    logs = run_pipeline(model.chunks, batches, builder, state, forward_only=False)
    if dump_grads and dump is not None:
        _save_stage_tensors(dump, f"grads_{name}", {name: model}, state, what="grads")
    applied, grad_norm = model.step()
    metrics = reduce_metrics(logs, state)
    metrics.update(grad_norm=grad_norm, step_applied=float(applied))
    return metrics


def run_demo(cfg: ExperimentConfig, *, dump_dir: str | None = None, init_from: str | None = None) -> dict:
    """Build (or resume), run ReMix iterations up to ``num_steps``, checkpoint, print a summary."""
    start = time.perf_counter()
    validate(cfg, world_size_from_env(), training=False)
    state = init_parallel(cfg)
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    critic = make_trainable(build_critic(cfg.model, state, seed=cfg.trainer.seed), cfg.critic_optimizer,
                            cfg.parallel, state)
    models = {"actor": actor, "critic": critic}
    dump = Path(dump_dir) if dump_dir else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    checkpoints = cfg.trainer.checkpoint_root
    first_step = 1
    if cfg.trainer.resume and latest_iteration(checkpoints) is not None:
        payload = load_checkpoint(checkpoints, models, state)
        first_step = payload["iteration"] + 1
        if state.rank == 0:
            print(f"resumed from {checkpoints} at iteration {payload['iteration']} "
                  f"(saved at {payload['layout']})", flush=True)
    else:
        if cfg.model.hf_path:
            load_hf_into(cfg.model.hf_path, cfg.model, state, actor=actor.unwrapped(), critic=critic.unwrapped())
        if init_from:
            _load_initial_weights(Path(init_from), models, state)
        for model in models.values():  # copy loaded weights into the optimizer's main params
            model.optimizer.reload_model_params()
    _save_stage_tensors(dump, "init", models, state, what="params")
    build_s = time.perf_counter() - start

    rollout = SyntheticRollout.make(cfg)
    history = []
    save_s = 0.0
    step_start = time.perf_counter()
    for step in range(first_step, cfg.trainer.num_steps + 1):
        outputs, actor_batches, critic_batches = _prepare_losses(cfg, rollout, actor, critic, state)
        if step == first_step and dump is not None and state.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in outputs.items()}, str(dump / "outputs.safetensors"))
        weight = kl_lambda(step, cfg.algorithm)
        builder = actor_loss_builder(cfg.algorithm, state, kl_lambda=weight)
        for update in range(phase(step, cfg.algorithm).utd):  # UTD passes over the same batch
            actor_metrics = _train_step(actor, actor_batches, builder, state, dump, "actor",
                                        step == first_step and update == 0)
        record = {"step": step, "actor": actor_metrics}
        if critic_batches is not None:
            record["critic"] = _train_step(critic, critic_batches, critic_loss_builder(cfg.algorithm), state,
                                           dump, "critic", step == first_step)
        history.append(record)
        if state.rank == 0:
            a, c = record["actor"], record.get("critic", {})
            print(f"step {step}: actor pg_loss {a['pg_loss']:+.5f} clip_frac {a['clip_frac']:.3f} "
                  f"ratio {a['ratio_mean']:.4f} (max {a['ratio_max']:.3f}) kl_ref {a['kl_ref']:.2e} "
                  f"entropy {a['entropy']:.3f} | critic value_loss {c.get('value_loss', float('nan')):.5f}",
                  flush=True)
        interval = cfg.trainer.save_interval
        if interval >= 0 and (step == cfg.trainer.num_steps or (interval and step % interval == 0)):
            save_start = time.perf_counter()
            path = save_checkpoint(checkpoints, step, models, state, {"demo_step": step}, config=cfg,
                                   keep_last=cfg.trainer.keep_checkpoints)
            save_s += time.perf_counter() - save_start
            if state.rank == 0:
                print(f"checkpoint saved: {path} ({time.perf_counter() - save_start:.1f} s)", flush=True)
    steps_run = max(cfg.trainer.num_steps - first_step + 1, 0)
    train_s = time.perf_counter() - step_start - save_s
    if dump is not None and state.rank == 0 and history:
        (dump / "metrics.json").write_text(json.dumps(history[0], indent=1))
    _save_stage_tensors(dump, "final", models, state, what="params")
    if dump is not None and not cfg.parallel.use_distributed_optimizer:
        _save_stage_tensors(dump, "moments", models, state, what="moments")
    counts = _count_parameters(models, state)
    summary = {"layout": f"TP{state.tensor_parallel} x PP{state.pipeline_parallel} x DP{state.data_parallel}",
               "world_size": state.world_size, "backend": state.runtime.backend,
               "device": state.runtime.device.type, "dtype": str(state.runtime.params_dtype),
               "actor_params": counts["actor"], "critic_params": counts["critic"], "steps": steps_run,
               "build_s": round(build_s, 2), "train_s_per_step": round(train_s / max(steps_run, 1), 3)}
    if state.rank == 0:
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    summary["history"] = history
    return summary
