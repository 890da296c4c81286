"""Engine/trainer mismatch correction: the weights by hand, and on a policy whose engine runs in
bf16 the corrected policy gradient is the trainer's (Monte Carlo) where the uncorrected one is not."""

from __future__ import annotations

import math

import pytest
import torch

from remix_megatron.algorithms import ActorLossInputs, actor_loss
from remix_megatron.algorithms.mismatch import masked_weights, mismatch_sums, truncated_weights
from remix_megatron.config import AlgorithmConfig

pytestmark = pytest.mark.unit


def test_weights_by_hand():
    behaviour = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.4, 0.4, 0.1]], dtype=torch.float64))
    engine = torch.log(torch.tensor([[0.25, 0.4, 0.3], [0.1, 0.4, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # w = b / e: [2, 0.5, (masked)], [4, 1, 1/9]
    tis = truncated_weights(behaviour, engine, mask, cap=3.0)
    torch.testing.assert_close(tis, torch.tensor([[2.0, 0.5, 0.0], [3.0, 1.0, 1 / 9]], dtype=torch.float64))
    mis = masked_weights(behaviour, engine, mask, cap=3.0)
    torch.testing.assert_close(mis, torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    # sequence level: products 1 and 4/9 on every token of the response
    seq = truncated_weights(behaviour, engine, mask, cap=3.0, level="sequence")
    torch.testing.assert_close(seq, torch.tensor([[1.0, 1.0, 0.0], [4 / 9] * 3], dtype=torch.float64))
    seq_mis = masked_weights(behaviour, engine, mask, cap=2.0, level="sequence")
    torch.testing.assert_close(seq_mis, torch.tensor([[1.0, 1.0, 0.0], [0.0] * 3], dtype=torch.float64))
    sums = mismatch_sums(behaviour, engine, mask)
    gaps = [math.log(2), math.log(2), math.log(4), 0.0, math.log(9)]
    k3 = [r - 1 - math.log(r) for r in (2, 0.5, 4, 1, 1 / 9)]
    torch.testing.assert_close(sums, torch.tensor([5.0, sum(gaps), max(gaps), sum(k3)], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown mismatch level .row."):
        truncated_weights(behaviour, engine, mask, cap=3.0, level="row")


def policy_gradient(logits, tokens, advantages, engine_logprobs, correction: str | None) -> torch.Tensor:
    """d/dlogits of the actor loss (PPO at ratio 1, no KL or entropy) over one-token rows."""
    theta = logits.clone().requires_grad_(True)
    logprobs = torch.log_softmax(theta, -1)[tokens].unsqueeze(-1)  # [N, 1]
    behaviour = logprobs.detach()
    mask = torch.ones_like(behaviour)
    weights = None
    if correction is not None:
        weights = truncated_weights(behaviour, engine_logprobs.unsqueeze(-1), mask, cap=1e6)
    inputs = ActorLossInputs(loss_mask=mask, advantages=advantages.unsqueeze(-1), behaviour_logprobs=behaviour,
                             pik_logprobs=behaviour, ref_logprobs=behaviour, prev_logprobs=behaviour,
                             sample_age=torch.zeros(len(tokens), dtype=torch.long), mismatch_weights=weights)
    cfg = AlgorithmConfig(policy_loss="ppo", kl_coef=0.0, entropy_coef=0.0, loss_agg="token_mean")
    result = actor_loss(logprobs, torch.zeros_like(logprobs), inputs, cfg, kl_lambda=1.0)
    (gradient,) = torch.autograd.grad(result.numerator / result.denominator, theta)
    return gradient


def test_bf16_engine_corrected_gradient_is_the_trainers():
    """The trainer's policy is softmax(logits) in fp32; the engine's is softmax of the logits in
    bf16 with a sharper temperature (a kernel and dtype difference that shifts the sampling
    distribution). Tokens come from the engine. Weighted by w = b / e, the loss's gradient is the
    exact on-policy gradient -sum_a pi(a) A(a) dlog pi(a) of the trainer; unweighted it is not."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=gen, dtype=torch.float64) * 1.5
    advantages_by_token = torch.randn(6, generator=gen, dtype=torch.float64)
    trainer = torch.softmax(logits, -1)
    engine_logp = torch.log_softmax((logits.to(torch.bfloat16) * 1.3).double(), -1)
    n = 400_000
    tokens = torch.multinomial(engine_logp.exp(), n, replacement=True, generator=gen)
    exact = -torch.autograd.functional.jacobian(lambda t: (torch.softmax(t, -1) * advantages_by_token).sum(), logits)
    corrected = policy_gradient(logits, tokens, advantages_by_token[tokens], engine_logp[tokens], "tis")
    plain = policy_gradient(logits, tokens, advantages_by_token[tokens], engine_logp[tokens], None)
    assert (engine_logp.exp() - trainer).abs().sum() > 0.1  # the distributions really differ
    error, bias = (corrected - exact).abs().max().item(), (plain - exact).abs().max().item()
    assert error < 0.01 < bias, (error, bias)
