"""Token-budget micro-batches: rows grouped longest first under a padded-token budget, each
micro-batch at its own width, the same rows (and loss inputs) as the fixed-size split."""

from __future__ import annotations

import pytest
import torch

from remix_megatron.algorithms import ActorLossInputs
from remix_megatron.algorithms.megatron_adapter import MicroBatch
from remix_megatron.batching import budget_micro_batches, loss_widths, scatter_rows, token_budget_groups
from remix_megatron.config import ConfigError, TrainerConfig

pytestmark = pytest.mark.unit


def padded_tokens(groups, widths):
    return sum(len(g) * max(widths[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(5))
def test_groups_stay_under_the_budget_and_cover_every_row_once(seed):
    widths = torch.randint(1, 65, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
    groups = token_budget_groups(widths, 128)
    assert sorted(i for g in groups for i in g) == list(range(40))
    for group in groups:
        assert len(group) * max(widths[i] for i in group) <= 128
        assert widths[group[0]] == max(widths[i] for i in group)  # longest first: the first row sets the width
        assert len(group) * widths[group[0]] <= 1.1 * sum(widths[i] for i in group)
    # greedy runs of sorted rows: the next row would have broken the budget or the padding slack
    for a, b in zip(groups, groups[1:]):
        grown = (len(a) + 1) * widths[a[0]]
        assert grown > 128 or grown > 1.1 * (sum(widths[i] for i in a) + widths[b[0]])


def test_groups_by_hand():
    widths = [8, 32, 30, 8, 64, 31, 16, 16, 16]
    # sorted: 64 (alone: 2 x 64 > 96); 32, 31, 30 (3 x 32 = 96 <= 96 and <= 1.1 x 93); 16 x 3 (48);
    # 8, 8 (16 x 4 = 64 > 1.1 x 56: the slack ends the run)
    assert token_budget_groups(widths, 96) == [[4], [1, 5, 2], [6, 7, 8], [0, 3]]
    assert token_budget_groups([200, 8], 96) == [[0], [1]]  # a row wider than the budget goes alone
    # splitting to a count halves the costliest group of several rows: 96 tokens, then [31, 30] (62 > 48)
    assert token_budget_groups(widths, 96, count=6) == [[4], [1], [5], [2], [6, 7, 8], [0, 3]]
    assert len(token_budget_groups([8, 8], 96, count=5)) == 2  # no more than one row each


def test_padding_ratio_of_a_long_tail_falls_under_1_1():
    """A long-tailed batch: padding to the longest row costs several times the real tokens; the budget close to 1."""
    torch.manual_seed(0)
    widths = [int(w) for w in (torch.distributions.Exponential(1 / 300).sample((256,)).clamp(max=8192) + 16)]
    real = sum(widths)
    fixed = sum(8 * max(widths[i:i + 8]) for i in range(0, 256, 8))
    assert fixed / real > 1.5
    assert padded_tokens(token_budget_groups(widths, 16384), widths) / real <= 1.1


def test_loss_widths_round_the_last_loss_token_up():
    mask = torch.zeros(3, 20)
    mask[0, 3:5] = 1  # last token at 4 -> 5 positions -> 8
    mask[2, 10:17] = 1  # -> 17 -> 20 (at most the width)
    assert loss_widths(mask, 8) == [8, 0, 20]


def micro(rows: int, width: int, lengths, first: int = 0) -> MicroBatch:
    tokens = torch.arange(first * width, (first + rows) * width).reshape(rows, width)
    mask = torch.zeros(rows, width)
    for row, n in enumerate(lengths):
        mask[row, 1:n] = 1
    inputs = ActorLossInputs(loss_mask=mask, advantages=tokens.float(), behaviour_logprobs=-mask,
                             pik_logprobs=-mask, ref_logprobs=-mask, prev_logprobs=-mask,
                             sample_age=torch.arange(first, first + rows))
    return MicroBatch(tokens=tokens, labels=tokens + 1, actor=inputs)


def test_regrouped_micro_batches_carry_the_same_rows_and_loss_inputs():
    lengths = [3, 16, 0, 9, 5, 14]
    whole = MicroBatch.concat([micro(3, 16, lengths[:3]), micro(3, 16, lengths[3:], first=3)])
    widths = loss_widths(whole.actor.loss_mask, 4)
    batches, order = budget_micro_batches(whole, widths, 32, group=2)
    assert sorted(order) == [0, 1, 3, 4, 5]  # row 2 has no loss tokens: left out
    assert len(batches) % 2 == 0
    seen = []
    for batch in batches:
        rows, width = batch.tokens.shape
        assert rows * width <= 32
        if batch.actor.loss_mask.sum() == 0:
            continue  # a silent copy for the group
        for r in range(rows):
            source = order[len(seen)]
            seen.append(source)
            assert torch.equal(batch.tokens[r], whole.tokens[source, :width])
            assert torch.equal(batch.actor.advantages[r], whole.actor.advantages[source, :width])
            assert int(batch.actor.sample_age[r]) == source
            assert whole.actor.loss_mask[source, width:].sum() == 0  # nothing of the loss is cut off
    assert seen == order
    total = sum(float(b.actor.loss_mask.sum()) for b in batches)
    assert total == float(whole.actor.loss_mask.sum())
    values = torch.cat([torch.nn.functional.pad(b.tokens.float(), (0, 16 - b.tokens.size(1))) for b in batches])
    back = scatter_rows(values, order, 6, 16)
    for row in order:
        width = widths[row]
        assert torch.equal(back[row, :width], whole.tokens[row, :width].float())
    assert back[2].abs().sum() == 0


def test_budget_below_seq_length_is_refused():
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        TrainerConfig(seq_length=64, max_tokens_per_micro_batch=32)
    assert TrainerConfig(seq_length=64, max_tokens_per_micro_batch=64).max_tokens_per_micro_batch == 64


def test_counts_agreed_across_ranks_stay_equal_in_whole_groups():
    """Two ranks agree on 5 micro-batches in groups of 2 (interleaved PP): one rank splits its rows
    to 5, the other has only 3 rows; both run 6, the extra ones silent."""
    many, few = micro(8, 16, [16] * 8), micro(3, 16, [16, 9, 5])
    for whole in (many, few):
        batches, _ = budget_micro_batches(whole, loss_widths(whole.actor.loss_mask, 8), 64, count=5, group=2)
        assert len(batches) == 6
        assert sum(float(b.actor.loss_mask.sum()) for b in batches) == float(whole.actor.loss_mask.sum())


def test_packed_groups_sum_their_rows():
    """Packed, a micro-batch costs its real tokens: rows longest first while the sum fits."""
    widths = [5, 30, 17, 9, 60, 22]
    # sorted 60, 30, 22, 17, 9, 5: 60 + 30 = 90 <= 96 (+22 > 96); 22 + 17 + 9 + 5 = 53
    assert token_budget_groups(widths, 96, packed=True) == [[4, 1], [5, 2, 3, 0]]


def test_packing_puts_rows_end_to_end_and_unpacks_them():
    lengths = [3, 16, 9, 5, 14]
    batch = micro(5, 16, lengths)
    packed = batch.packed(lengths, 8)
    assert packed.tokens.shape == (1, 48) and packed.shape == (5, 16)  # 47 tokens + 1 filler: a multiple of 8
    assert packed.packing.cu_seqlens.tolist() == [0, 3, 19, 28, 33, 47, 48]
    assert packed.packing.cu_seqlens.dtype == torch.int32
    for row, n in enumerate(lengths):
        start = int(packed.packing.cu_seqlens[row])
        assert torch.equal(packed.tokens[0, start:start + n], batch.tokens[row, :n])
        assert torch.equal(packed.labels[0, start:start + n], batch.labels[row, :n])
    positions = packed.packing.position_ids(torch.device("cpu"))
    assert positions[0, :4].tolist() == [0, 1, 2, 0] and positions[0, -2:].tolist() == [13, 0]
    back = packed.unpacked(packed.tokens.float())
    for row, n in enumerate(lengths):
        assert torch.equal(back[row, :n], batch.tokens[row, :n].float()) and back[row, n:].abs().sum() == 0
    assert packed.actor is batch.actor  # the loss inputs stay padded [rows, width]


def test_a_packed_micro_batch_gives_the_padded_loss():
    """The actor and critic losses of a packed micro-batch (logits of its rows end to end) equal
    the padded micro-batch's: the loss reads the unpacked per-token values."""
    from types import SimpleNamespace

    from remix_megatron.algorithms.megatron_adapter import CriticTargets, actor_loss_builder, critic_loss_builder
    from remix_megatron.config import AlgorithmConfig

    lengths = [3, 16, 9, 5]
    gen = torch.Generator().manual_seed(0)
    batch = micro(4, 16, lengths)
    batch = MicroBatch(tokens=batch.tokens % 50, labels=batch.labels % 50, actor=batch.actor,
                       critic=CriticTargets(loss_mask=batch.actor.loss_mask,
                                            old_values=torch.rand(4, 16, generator=gen),
                                            returns=torch.rand(4, 16, generator=gen)))
    packed = batch.packed(lengths, 8)
    logits = torch.randn(4, 16, 50, generator=gen)
    values = torch.randn(4, 16, 1, generator=gen)
    end_to_end = lambda t: torch.cat([t[row, :n] for row, n in enumerate(lengths)]  # noqa: E731
                                     + [t.new_zeros(packed.tokens.size(1) - sum(lengths), *t.shape[2:])]).unsqueeze(0)
    cfg = AlgorithmConfig()
    state = SimpleNamespace(tp_group=None)
    for builder, output in ((actor_loss_builder(cfg, state, kl_lambda=0.5), logits),
                            (critic_loss_builder(cfg), values)):
        padded_loss, padded_count, _ = builder(batch)(output)
        packed_loss, packed_count, _ = builder(packed)(end_to_end(output))
        assert torch.allclose(packed_loss, padded_loss, rtol=1e-6) and int(packed_count) == int(padded_count)
        assert float(padded_loss) != 0


def test_packed_sequences_are_refused_without_a_budget_and_on_cpu(tmp_path):
    from remix_megatron.config import load_config
    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.validation import training_problems
    from tests.conftest import REPO

    with pytest.raises(ConfigError, match="set trainer.max_tokens_per_micro_batch"):
        TrainerConfig(packed_sequences=True)
    tiny = build_tiny_model()
    cfg = load_config(REPO / "configs" / "tiny_remix_ppo.yaml", [
        f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl", "trainer.packed_sequences=true",
        "trainer.max_tokens_per_micro_batch=96"])
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run packed sequences")
    assert [p for p in training_problems(cfg) if "packed" in p] == [
        "trainer.packed_sequences=true needs CUDA GPUs and the TransformerEngine layer spec (THD attention; "
        "Megatron's local spec has none): on CPU use trainer.max_tokens_per_micro_batch alone"]


def test_concat_keeps_a_pass_that_was_not_run_as_none():
    """Regrouping rows under a budget joins micro-batches; a loss input the loop skipped (the
    reference or precedent with weight 0) stays None instead of failing the join."""
    from remix_megatron.algorithms import ActorLossInputs
    from remix_megatron.algorithms.megatron_adapter import MicroBatch

    def batch(value: float) -> MicroBatch:
        ones = torch.full((2, 3), value)
        actor = ActorLossInputs(loss_mask=ones, advantages=ones, behaviour_logprobs=ones, pik_logprobs=ones,
                                ref_logprobs=None, prev_logprobs=ones, sample_age=torch.zeros(2, dtype=torch.long))
        return MicroBatch(tokens=ones.long(), labels=ones.long(), actor=actor)

    joined = MicroBatch.concat([batch(1.0), batch(2.0)])
    assert joined.actor.ref_logprobs is None and joined.actor.prev_logprobs[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
