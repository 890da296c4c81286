"""torchrun worker for the precision test: the tiny actor's log-probs on fixed rows, then one
optimizer step on their negative log-likelihood, at the configured ``parallel.precision``.

python -m torch.distributed.run --nproc_per_node N -m tests.distributed.precision_worker TINY ROWS OUT [overrides]

ROWS is a ``torch.save``d dict of ``tokens`` / ``labels`` / ``mask`` ``[b, s]``. Writes OUT.rank{r}.pt
with the log-probs before and after the step (every rank), this rank's gradient and the dtypes
of its parameters, gradients and optimizer state.
"""

import sys
from functools import partial

import torch

from remix_megatron.algorithms.megatron_adapter import forward_logprobs, run_pipeline, split_micro_batches
from remix_megatron.config import load_config
from remix_megatron.convert.export import load_hf_into
from remix_megatron.models import build_actor, make_trainable
from remix_megatron.models.logprobs import vocab_parallel_logprobs_entropy
from remix_megatron.parallel import destroy_parallel, init_parallel


def nll_builder(mask: torch.Tensor, state):
    """Loss functions for the summed negative log-likelihood of the masked tokens (rows in micro-batch order)."""
    rows = iter(mask.split(4))

    def loss_func(batch_mask, batch, logits):
        assert logits.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")  # the loss runs in fp32
        logprobs, _ = vocab_parallel_logprobs_entropy(logits, batch.labels, state.tp_group)
        return -(logprobs * batch_mask).sum(), batch_mask.sum().int(), {}

    return lambda batch: partial(loss_func, next(rows), batch)


def main(tiny: str, rows: str, out: str, *overrides: str) -> None:
    cfg = load_config("configs/tiny_remix_ppo.yaml", [f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
                                                      "actor_optimizer.lr=1e-3", *overrides])
    state = init_parallel(cfg)
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    load_hf_into(tiny, cfg.model, state, actor=actor.unwrapped())
    actor.optimizer.reload_model_params()
    data = torch.load(rows)
    batches = split_micro_batches(data["tokens"], data["labels"], 4)
    before, _ = forward_logprobs(actor.chunks, batches, state)
    actor.zero_grad()
    run_pipeline(actor.chunks, batches, nll_builder(data["mask"], state), state, forward_only=False)
    params = [p for chunk in actor.chunks for p in chunk.parameters()]
    grad = torch.cat([p.main_grad.flatten() for p in params]).clone()
    applied, _ = actor.step()
    after, _ = forward_logprobs(actor.chunks, batches, state)
    optimizer_state = [actor.adam_moment(p, key) for p in params for key in ("exp_avg", "exp_avg_sq")]
    torch.save({"before": before, "after": after, "grad": grad, "applied": applied,
                "dtypes": sorted({str(t.dtype) for t in [*params, *(p.main_grad for p in params), *optimizer_state]})},
               f"{out}.rank{state.rank}.pt")
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
