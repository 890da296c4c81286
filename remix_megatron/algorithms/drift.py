"""Policy drift diagnostics, as pure tensor functions of log-probs the loop already has.

Inputs are ``[batch, seq]`` log-probs of the sampled tokens, a ``[batch, seq]`` loss mask and
``sample_age [batch]`` (0 = fresh). Fresh tokens were sampled from pi_k, so with
r = pi_{k-1} / pi_k on them:

- ``drift/kl_prev_fresh``: KL(pi_k || pi_{k-1}) per fresh token, by the k3 estimator
  E_{pi_k}[(r - 1) - log r] (unbiased, >= 0 per token; clamped as the loss's k3 is);
- ``drift/tv_prev_fresh``: the total variation per token, 0.5 * E_{pi_k}|1 - r| (unbiased:
  0.5 * sum_x |pi_k(x) - pi_{k-1}(x)| = 0.5 * E_{x~pi_k}|1 - pi_{k-1}(x) / pi_k(x)|).

``actor/ratio_mean`` (the mean of pi / b under b) is ~1 by construction and shows no drift;
these do. On replayed tokens of age a, w = pi_k / b (b = pi_{k-a}):

- ``drift/abs_w_minus_1/age{a}``: mean |w - 1|;
- ``drift/outside_window/age{a}``: share with w outside PPO's window [1 - eps_low, 1 + eps_high].

``adapt_lr_scale`` is GePPO's adaptive learning rate on the measured per-token TV.

``malformed`` flags a response with text after its final ``\\boxed{...}`` or with that box's
braces unbalanced (``drift/malformed_rate`` is its share of the fresh responses).
"""

from __future__ import annotations

import torch

from remix_megatron.algorithms.kl import kl_k3
from remix_megatron.algorithms.metrics import Mean

BOX = "\\boxed{"


def fresh_drift(pik_logprobs: torch.Tensor, prev_logprobs: torch.Tensor, mask: torch.Tensor,
                sample_age: torch.Tensor) -> dict[str, Mean]:
    """KL (k3) and TV of pi_k against pi_{k-1} per fresh token (age 0), as mergeable means."""
    fresh = mask * (sample_age == 0).to(mask.dtype).unsqueeze(-1)
    r = ((prev_logprobs - pik_logprobs) * fresh).exp()  # 1 outside the fresh tokens
    return {"drift/kl_prev_fresh": Mean.of(kl_k3(pik_logprobs, prev_logprobs), fresh),
            "drift/tv_prev_fresh": Mean.of(0.5 * (1 - r).abs(), fresh)}


def replay_drift(pik_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                 sample_age: torch.Tensor, *, max_age: int, eps_low: float, eps_high: float) -> dict[str, Mean]:
    """Mean |w - 1| and the share outside [1 - eps_low, 1 + eps_high] per replayed age 1..max_age."""
    w = ((pik_logprobs - behaviour_logprobs) * mask).exp()
    outside = ((w < 1 - eps_low) | (w > 1 + eps_high)).to(mask.dtype)
    out = {}
    for age in range(1, max_age + 1):
        aged = mask * (sample_age == age).to(mask.dtype).unsqueeze(-1)
        out[f"drift/abs_w_minus_1/age{age}"] = Mean.of((w - 1).abs(), aged)
        out[f"drift/outside_window/age{age}"] = Mean.of(outside, aged)
    return out


def malformed(text: str) -> bool:
    """Text after the final ``\\boxed{...}``, or that box's braces never closing; no box: False."""
    start = text.rfind(BOX)
    if start < 0:
        return False
    depth = 1
    for index in range(start + len(BOX), len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return bool(text[index + 1:].strip())
    return True


def adapt_lr_scale(scale: float, tv: float, *, low: float, high: float, factor: float, min_scale: float) -> float:
    """The actor's next lr scale: / factor when ``tv`` > ``high``, * factor when < ``low``, kept in [min_scale, 1]."""
    if tv > high:
        scale /= factor
    elif tv < low:
        scale *= factor
    return min(max(scale, min_scale), 1.0)
