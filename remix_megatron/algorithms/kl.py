"""Per-token KL estimators and the KL-convex constraint (ReMix paper Eq. 5).

For tokens sampled from the current policy, with ``log_ratio = log pi - log pi_other``:

    k1 = log_ratio                                  unbiased, high variance, can be < 0
    k2 = log_ratio**2 / 2                           biased, low variance
    k3 = exp(-log_ratio) + log_ratio - 1            unbiased, >= 0, low variance ("low_var_kl")

k3 is computed with the log-ratio clamped to [-20, 20] and the result clamped to [-10, 10]
(as in verl's low_var_kl), so one badly off token cannot dominate the loss.
Shapes: ``[batch, seq]``.
"""

from __future__ import annotations

from typing import Callable

import torch

from remix_megatron.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def kl_k1(logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - other_logprobs


def kl_k2(logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - other_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = (other_logprobs - logprobs).clamp(-20.0, 20.0)  # log(pi_other / pi)
    return (log_ratio.exp() - log_ratio - 1).clamp(-10.0, 10.0)


KL_ESTIMATORS.register("k1", kl_k1)
KL_ESTIMATORS.register("k2", kl_k2)
KL_ESTIMATORS.register("k3", kl_k3)


def kl_weights(kl_coef: float, kl_convex: bool, kl_lambda: float) -> tuple[float, float]:
    """The loss weights ``(beta * w_ref, beta * w_prev)`` of KL to the reference and to the
    precedent policy: ``(beta * lambda, beta * (1 - lambda))`` with KL-convex, ``(beta, 0)``
    without it. A pass whose weight is 0 enters no loss (the trainer may skip it)."""
    weight = kl_lambda if kl_convex else 1.0
    return kl_coef * weight, kl_coef * (1.0 - weight)


def kl_convex(logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, prev_logprobs: torch.Tensor | None, *,
              kl_lambda: float, estimator: str = "k3"
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``lambda * KL(pi || pi_ref) + (1 - lambda) * KL(pi || pi_prev)`` per token.

    Returns ``(combined, kl_to_ref, kl_to_prev)``. With ``kl_lambda == 1`` the precedent
    term has weight 0 (it is still returned, for logging). A side passed as None (not
    computed) must have weight 0 and is returned as None; with both None, so is the sum.
    """
    if not 0.0 <= kl_lambda <= 1.0:
        raise ValueError(f"kl_lambda={kl_lambda} must lie in [0, 1]")
    estimate = KL_ESTIMATORS.get(estimator)
    to_ref = None if ref_logprobs is None else estimate(logprobs, ref_logprobs)
    to_prev = None if prev_logprobs is None else estimate(logprobs, prev_logprobs)
    if to_ref is not None and to_prev is not None:
        return kl_lambda * to_ref + (1.0 - kl_lambda) * to_prev, to_ref, to_prev
    if (to_ref is None and kl_lambda > 0) or (to_prev is None and kl_lambda < 1):
        if to_ref is not None or to_prev is not None:
            missing = "reference" if to_ref is None else "precedent"
            raise ValueError(f"KL to the {missing} policy has weight > 0 (kl_lambda={kl_lambda}) but was not computed")
        return None, None, None
    return (kl_lambda * to_ref if to_prev is None else (1.0 - kl_lambda) * to_prev), to_ref, to_prev
