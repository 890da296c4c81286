"""The critic's clipped value loss (PPO): shapes ``[batch, seq]``."""

from __future__ import annotations

import torch


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * max((v - R)^2, (v_clip - R)^2)`` with ``v_clip = v_old + clamp(v - v_old, -clip, clip)``.

    Returns ``(per_token_loss, clipped)`` where ``clipped`` marks tokens whose clipped branch
    is the larger (so the gradient through ``v`` is zero there). ``clip <= 0`` disables clipping.
    """
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    # Inside the window the clipped value is v itself: old + (v - old) can round 1 ulp away from v
    # (v - old is inexact when v > 2 old), and that alone would mark the token clipped.
    move = values - old_values
    clipped_values = torch.where(move.abs() <= clip, values, old_values + move.clamp(-clip, clip))
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped
