"""The smallest real thing the package does end to end, until the RL trainer lands.

Builds the actor and the critic from a config at its TP x PP x DP layout, runs
``trainer.num_steps`` optimizer steps of both through Megatron's pipeline schedules on a
seeded synthetic batch (actor: a policy-gradient surrogate with an entropy bonus on fixed
advantages; critic: squared error to fixed returns), and prints a summary. It is a check
that the parallel machinery works, not ReMix: the RL losses arrive with the trainer.

``dump_dir`` writes, as safetensors, what the multi-process tests compare across layouts:
per-token log-probs/entropies/values, full (TP-gathered) gradients of the first step and
full parameters before and after training, one file per pipeline stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from remix_megatron.config import ExperimentConfig
from remix_megatron.models import (
    build_actor, build_critic, iter_full_tensors, load_full_state_dict, make_trainable,
    vocab_parallel_logprobs_entropy,
)
from remix_megatron.parallel import ParallelState, init_parallel

ENTROPY_COEF = 0.01


@dataclass(frozen=True)
class SyntheticBatch:
    """The global batch, identical on every rank: ``[global_batch, seq]`` tensors."""

    tokens: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @staticmethod
    def make(cfg: ExperimentConfig) -> "SyntheticBatch":
        gen = torch.Generator().manual_seed(cfg.trainer.seed)
        shape = (cfg.trainer.global_batch_size, cfg.trainer.seq_length)
        sequence = torch.randint(0, cfg.model.vocab_size, (shape[0], shape[1] + 1), generator=gen)
        return SyntheticBatch(tokens=sequence[:, :-1].contiguous(), labels=sequence[:, 1:].contiguous(),
                              advantages=torch.randn(shape, generator=gen), returns=torch.randn(shape, generator=gen))

    def micro_batches(self, state: ParallelState, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This DP rank's contiguous share of the batch, cut into micro-batches."""
        rows = self.tokens.size(0) // state.data_parallel
        start = state.dp_rank * rows
        seq = self.tokens.size(1)
        position_ids = torch.arange(seq).unsqueeze(0).expand(micro_batch_size, -1)
        causal_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
        device = state.runtime.device
        out = []
        for first in range(start, start + rows, micro_batch_size):
            rows_slice = slice(first, first + micro_batch_size)
            fields = dict(tokens=self.tokens, labels=self.labels, advantages=self.advantages, returns=self.returns)
            batch = {name: value[rows_slice].to(device) for name, value in fields.items()}
            batch.update(position_ids=position_ids.to(device), attention_mask=causal_mask.to(device))
            out.append(batch)
        return out


def _actor_loss(batch, state: ParallelState, logits: torch.Tensor):
    logprobs, entropy = vocab_parallel_logprobs_entropy(logits, batch["labels"], state.tp_group)
    per_token = -(logprobs * batch["advantages"]) - ENTROPY_COEF * entropy
    num_tokens = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
    loss_sum = per_token.sum()
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()]),
                                  "logprobs": logprobs.detach(), "entropy": entropy.detach()}


def _critic_loss(batch, state: ParallelState, values: torch.Tensor):
    values = values.squeeze(-1).float()
    per_token = 0.5 * (values - batch["returns"]) ** 2
    num_tokens = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
    loss_sum = per_token.sum()
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()]),
                                  "values": values.detach()}


def _run_schedule(chunks, micro_batches, loss_fn, state: ParallelState, cfg: ExperimentConfig, *, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        return output, partial(loss_fn, batch, state)

    num_micro = len(micro_batches)
    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    with torch.no_grad() if forward_only else torch.enable_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks, num_microbatches=num_micro,
            seq_length=cfg.trainer.seq_length, micro_batch_size=cfg.trainer.micro_batch_size,
            forward_only=forward_only)


def _global_mean_loss(logs: list[dict], state: ParallelState) -> float | None:
    """Token-mean loss over the whole global batch (last stage only; None elsewhere)."""
    if not state.is_last_stage:
        return None
    total = torch.stack([entry["loss"] for entry in logs]).sum(0)
    dist.all_reduce(total, group=state.dp_group)
    return (total[0] / total[1]).item()


def _gather_rows(logs: list[dict], key: str, state: ParallelState) -> torch.Tensor:
    local = torch.cat([entry[key] for entry in logs]).cpu()
    parts = [torch.empty_like(local) for _ in range(state.data_parallel)]
    dist.all_gather(parts, local.contiguous(), group=state.dp_group)
    return torch.cat(parts)


def _save_stage_tensors(dump_dir: Path | None, name: str, models: dict, state: ParallelState, *, grads: bool) -> None:
    """Write this stage's full tensors (collective over TP; DP rank 0 of TP rank 0 writes)."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, model in models.items():
        for key, tensor in iter_full_tensors(model.unwrapped(), state, grads=grads):
            tensors[f"{prefix}.{key}"] = tensor.detach().float().cpu().contiguous()
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
                sharded = getattr(param, "tensor_model_parallel", False)
                if sharded or state.tp_rank == 0:
                    local += param.numel()
        total = torch.tensor([local if state.dp_rank == 0 else 0], dtype=torch.long)
        dist.all_reduce(total)
        counts[prefix] = int(total.item())
    return counts


def run_demo(cfg: ExperimentConfig, *, dump_dir: str | None = None, init_from: str | None = None) -> dict:
    """Build, train ``num_steps`` steps, print a summary on rank 0; returns the summary."""
    start = time.perf_counter()
    state = init_parallel(cfg)
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    critic = make_trainable(build_critic(cfg.model, state, seed=cfg.trainer.seed), cfg.critic_optimizer,
                            cfg.parallel, state)
    models = {"actor": actor, "critic": critic}
    dump = Path(dump_dir) if dump_dir else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    if init_from:
        _load_initial_weights(Path(init_from), models, state)
    for model in models.values():  # copy loaded weights into the optimizer's fp32 main params
        model.optimizer.reload_model_params()
    _save_stage_tensors(dump, "init", models, state, grads=False)
    build_s = time.perf_counter() - start

    batch = SyntheticBatch.make(cfg)
    micro = batch.micro_batches(state, cfg.trainer.micro_batch_size)
    actor_fwd = _run_schedule(actor.chunks, micro, _actor_loss, state, cfg, forward_only=True)
    critic_fwd = _run_schedule(critic.chunks, micro, _critic_loss, state, cfg, forward_only=True)
    if state.is_last_stage:
        outputs = {"logprobs": _gather_rows(actor_fwd, "logprobs", state),
                   "entropy": _gather_rows(actor_fwd, "entropy", state),
                   "values": _gather_rows(critic_fwd, "values", state)}
        if dump is not None and state.tp_rank == 0 and state.dp_rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in outputs.items()}, str(dump / "outputs.safetensors"))

    history = []
    step_start = time.perf_counter()
    for step in range(cfg.trainer.num_steps):
        record = {"step": step}
        for name, model, loss_fn in (("actor", actor, _actor_loss), ("critic", critic, _critic_loss)):
            model.zero_grad()
            logs = _run_schedule(model.chunks, micro, loss_fn, state, cfg, forward_only=False)
            if step == 0 and dump is not None:
                _save_stage_tensors(dump, f"grads_{name}", {name: model}, state, grads=True)
            applied, grad_norm = model.step()
            record[f"{name}_loss"] = _global_mean_loss(logs, state)
            record[f"{name}_grad_norm"] = grad_norm
            record[f"{name}_step_applied"] = applied
        history.append(record)
        if state.rank == state.world_size - 1:  # a last-stage rank knows the losses
            print(f"step {step}: actor loss {record['actor_loss']:.5f} (grad norm {record['actor_grad_norm']:.4f})"
                  f" | critic loss {record['critic_loss']:.5f} (grad norm {record['critic_grad_norm']:.4f})",
                  flush=True)
    train_s = time.perf_counter() - step_start
    _save_stage_tensors(dump, "final", models, state, grads=False)
    counts = _count_parameters(models, state)
    summary = {"layout": f"TP{state.tensor_parallel} x PP{state.pipeline_parallel} x DP{state.data_parallel}",
               "world_size": state.world_size, "backend": state.runtime.backend,
               "device": state.runtime.device.type, "dtype": str(state.runtime.params_dtype),
               "actor_params": counts["actor"], "critic_params": counts["critic"], "steps": cfg.trainer.num_steps,
               "build_s": round(build_s, 2), "train_s_per_step": round(train_s / cfg.trainer.num_steps, 3)}
    if state.rank == 0:
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    summary["history"] = history
    return summary
