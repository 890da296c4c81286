"""Vocab-parallel log-probs/entropy against torch's own log_softmax, values and gradients."""

import pytest
import torch

from remix_megatron.models.logprobs import vocab_parallel_logprobs_entropy

pytestmark = pytest.mark.unit


def reference(logits, targets):
    logp_all = torch.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def test_matches_log_softmax_values_and_grads():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    w_lp = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    lp, ent = vocab_parallel_logprobs_entropy(logits, targets)
    (grad,) = torch.autograd.grad((lp * w_lp + ent * w_ent).sum(), logits)
    ref_lp, ref_ent = reference(logits, targets)
    (ref_grad,) = torch.autograd.grad((ref_lp * w_lp + ref_ent * w_ent).sum(), logits)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_gradcheck():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_logprobs_entropy(z, targets), (logits,))


def test_hand_computed_uniform_and_peaked():
    # Uniform over 4 tokens: log p = -log 4, entropy = log 4.
    lp, ent = vocab_parallel_logprobs_entropy(torch.zeros(1, 1, 4), torch.tensor([[2]]))
    assert lp.item() == pytest.approx(-torch.log(torch.tensor(4.0)).item(), abs=1e-6)
    assert ent.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-6)
    # Huge logits stay finite (max subtraction): p(target) -> 1, entropy -> 0.
    lp, ent = vocab_parallel_logprobs_entropy(torch.tensor([[[1e4, 0.0, 0.0]]]), torch.tensor([[0]]))
    assert lp.item() == pytest.approx(0.0, abs=1e-6) and ent.item() == pytest.approx(0.0, abs=1e-6)


def test_bf16_input_computes_in_fp32_and_returns_bf16_grad():
    logits = torch.randn(2, 3, 8).to(torch.bfloat16).requires_grad_()
    lp, ent = vocab_parallel_logprobs_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_logprobs_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
