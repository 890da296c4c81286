"""Engine/trainer mismatch: the engine samples from its own numerics (bf16, fused kernels, another
attention implementation), while the loss treats the sample as drawn from the trainer's behaviour
policy b (the actor's recomputed log-probs). Per token, with e the engine's log-prob of the
sampled token:

    w_t = b(a_t) / e(a_t) = exp(behaviour_t - engine_t)

E_engine[w * f] = E_b[f], so weighting each token's policy loss by w corrects the gradient to
the trainer's policy; truncating or masking w bounds its variance:

    tis, token:     min(w_t, cap)                        (truncated importance sampling)
    tis, sequence:  min(prod_t w_t, cap) on every token of the response
    mis, token:     w_t if 1/cap <= w_t <= cap, else 0   (masked importance sampling)
    mis, sequence:  prod_t w_t if within [1/cap, cap], else 0, on every token

Shapes ``[batch, seq]``; outside ``mask`` the weight is 0. Pure tensor code.
"""

from __future__ import annotations

import torch

from remix_megatron.registry import Registry

MISMATCH_CORRECTIONS: Registry = Registry("mismatch correction")
# log w per token -> the log weight each token gets: its own, or its response's sum broadcast
MISMATCH_LEVELS: Registry = Registry("mismatch level")
MISMATCH_LEVELS.register("token", lambda log_w: log_w)
MISMATCH_LEVELS.register("sequence", lambda log_w: log_w.sum(-1, keepdim=True).expand_as(log_w))


def _log_weights(behaviour: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    return MISMATCH_LEVELS.get(level)((behaviour - engine) * mask)


def truncated_weights(behaviour: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, *, cap: float,
                      level: str = "token") -> torch.Tensor:
    log_w = _log_weights(behaviour, engine, mask, level)
    return log_w.clamp(max=20.0).exp().clamp(max=cap) * mask


def masked_weights(behaviour: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, *, cap: float,
                   level: str = "token") -> torch.Tensor:
    log_w = _log_weights(behaviour, engine, mask, level)
    bound = torch.log(torch.tensor(float(cap), dtype=log_w.dtype))
    inside = (log_w.abs() <= bound).to(mask.dtype)
    return log_w.clamp(max=20.0).exp() * inside * mask


MISMATCH_CORRECTIONS.register("none", lambda *args, **kwargs: None)  # off: the loss is unweighted
MISMATCH_CORRECTIONS.register("tis", truncated_weights)
MISMATCH_CORRECTIONS.register("mis", masked_weights)


def mismatch_sums(behaviour: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[4]`` sums to reduce over ranks: tokens, sum |b - e|, max |b - e|, and the k3 estimate of
    KL(engine || trainer) summed over tokens (the tokens are engine samples; >= 0 per token)."""
    gap = (behaviour - engine) * mask
    log_r = gap.clamp(-20.0, 20.0)  # log(b / e)
    k3 = (log_r.exp() - 1 - log_r) * mask
    return torch.stack([mask.sum(), gap.abs().sum(), gap.abs().max() if gap.numel() else gap.new_zeros(()),
                        k3.sum()]).double()
