"""Masked reductions and loss aggregation as (numerator, denominator) pairs.

Every aggregation mode is written as ``numerator / denominator`` where both are sums over
sequences, so they add up across micro-batches and data-parallel ranks: Megatron's schedules
sum the numerators' gradients and ``finalize_model_grads`` divides by the total denominator
(``calculate_per_token_loss=True``). This is what makes the loss of a global batch the same
however it is split.

Shapes: ``per_token`` and ``mask`` are ``[batch, seq]``; ``mask`` is 1 on tokens that count.
"""

from __future__ import annotations

from typing import Callable

import torch

from remix_megatron.registry import Registry

#: mode -> f(per_token, mask, tokens per sequence [batch], sequences with tokens [], norm_tokens) -> (num, den)
Aggregation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
LOSS_AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens where ``mask`` is set (0 when none are)."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def _token_mean(per_token, mask, tokens_per_seq, num_seqs, norm_tokens):
    return masked_sum(per_token, mask), tokens_per_seq.sum().to(torch.int)


def _seq_mean_token_mean(per_token, mask, tokens_per_seq, num_seqs, norm_tokens):
    per_seq = (per_token * mask).sum(-1) / tokens_per_seq.clamp(min=1)
    return per_seq.sum(), num_seqs.to(torch.int)


def _seq_mean_token_sum(per_token, mask, tokens_per_seq, num_seqs, norm_tokens):
    return masked_sum(per_token, mask), num_seqs.to(torch.int)


def _token_sum_norm(per_token, mask, tokens_per_seq, num_seqs, norm_tokens):
    if norm_tokens <= 0:
        raise ValueError(f"token_sum_norm needs norm_tokens > 0, got {norm_tokens}")
    return masked_sum(per_token, mask), (num_seqs * norm_tokens).to(torch.int)


LOSS_AGGREGATIONS.register("token_mean", _token_mean)
LOSS_AGGREGATIONS.register("seq_mean_token_mean", _seq_mean_token_mean)
LOSS_AGGREGATIONS.register("seq_mean_token_sum", _seq_mean_token_sum)
LOSS_AGGREGATIONS.register("token_sum_norm", _token_sum_norm)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, norm_tokens: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(numerator, denominator)`` with ``loss = numerator / denominator``.

    - ``token_mean``: every valid token of the batch weighs the same.
    - ``seq_mean_token_mean``: mean over tokens within a sequence, then over sequences.
    - ``seq_mean_token_sum``: sum over tokens within a sequence, mean over sequences.
    - ``token_sum_norm``: sum over all tokens / (sequences * ``norm_tokens``) (Dr. GRPO).
    Sequences without valid tokens count in none of them. The denominator is an int tensor.
    """
    reduce = LOSS_AGGREGATIONS.get(mode)
    mask = mask.to(per_token.dtype)
    tokens_per_seq = mask.sum(-1)
    return reduce(per_token, mask, tokens_per_seq, (tokens_per_seq > 0).sum(), norm_tokens)
