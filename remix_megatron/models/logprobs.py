"""Per-token log-probabilities and entropy from vocabulary-parallel logits.

Each tensor-parallel rank holds logits for a contiguous slice of the vocabulary. Only three
``[b, s]`` all-reduces cross ranks (max, sum of exponentials, and the target/entropy terms);
no rank ever holds the full vocabulary. The backward pass is written out (as in Megatron's
``vocab_parallel_cross_entropy``) because the softmax normaliser is shared across ranks:
with autograd through an identity-backward all-reduce, the entropy gradient would miss the
other ranks' terms. With ``p = softmax(z)`` over the full vocabulary and target ``t``:

    d log p_t / d z_i = 1[i = t] - p_i
    d H / d z_i       = -p_i (log p_i + H)

Both are local to the rank owning ``z_i`` once the normaliser and ``H`` are known.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start):
        ctx.input_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        vocab_part = logits.size(-1)
        max_logit = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
        shifted = logits - max_logit.unsqueeze(-1)
        exp_shifted = shifted.exp()
        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < vocab_part)
        target_logit = shifted.gather(-1, local_target.clamp(0, vocab_part - 1).unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
        sum_exp_local = exp_shifted.sum(-1)
        weighted_local = exp_shifted.mul_(shifted).sum(-1)  # exp_shifted is not needed after this
        sums = torch.stack([sum_exp_local, target_logit, weighted_local])
        sum_exp, target_logit, weighted = _all_reduce(sums, dist.ReduceOp.SUM, group).unbind(0)
        log_normaliser = sum_exp.log()
        logprobs = target_logit - log_normaliser
        entropy = log_normaliser - weighted / sum_exp
        ctx.save_for_backward(shifted, log_normaliser, entropy, local_target, owned)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        shifted, log_normaliser, entropy, local_target, owned = ctx.saved_tensors
        # grad = -p * (g_lp + g_H * (log p + H)), built in place on two vocab-sized buffers
        log_p = shifted - log_normaliser.unsqueeze(-1)
        grad = log_p.exp()
        log_p.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(grad_logprobs.unsqueeze(-1))
        grad.mul_(log_p).neg_()
        index = local_target.clamp(0, shifted.size(-1) - 1).unsqueeze(-1)
        grad.scatter_add_(-1, index, (grad_logprobs * owned).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and entropy of the full-vocabulary softmax.

    Args:
        logits: ``[b, s, v/tp]`` this rank's vocabulary slice (computed in fp32, or fp64 for fp64 input).
        targets: ``[b, s]`` token ids in the full vocabulary.
        tp_group: the tensor-parallel group; None (or a group of one) for unsharded logits.
    Returns:
        ``(logprobs [b, s], entropy [b, s])`` in fp32 (fp64 for fp64 input), identical on every TP rank.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [b, s]")
    rank = dist.get_rank(group=tp_group) if tp_group is not None and dist.get_world_size(tp_group) > 1 else 0
    vocab_start = rank * logits.size(-1)
    return _VocabParallelLogProbEntropy.apply(logits, targets, tp_group, vocab_start)
