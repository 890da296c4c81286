"""Trajectories into training tensors: packing, the mixed batch of one iteration, its forward
passes, and the split into micro-batches and minibatches.

One iteration's batch is packed once (``TrainingBatch.pack``): its rows are shuffled (so every
minibatch mixes sample ages), padded with masked copies to whole micro-batches, and right-padded
to a common width. The forward-only passes (``batch_forwards``) run on row subsets selected from
that packing, never re-packed; ``micro_batches`` cuts the batch with its loss inputs for
Megatron's schedules, and ``minibatches`` orders them into the optimizer steps of a UTD pass.

Shapes: ``b`` rows, ``w`` positions (the longest row rounded up to ``multiple``, at most
``trainer.seq_length``). Position ``t`` predicts ``labels[t] = tokens[t + 1]``: a response token
at sequence position ``j`` is predicted at ``j - 1``, and that is where its loss mask, behaviour
log-prob, stored value and (for the last one) reward go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS,
    ActorLossInputs,
    AdvantageInputs,
    AdvantageOutput,
    Phase,
    needs_critic,
)
from remix_megatron.algorithms.megatron_adapter import (
    CriticTargets,
    MicroBatch,
    forward_logprobs,
    forward_values,
    split_micro_batches,
)
from remix_megatron.algorithms.mismatch import MISMATCH_CORRECTIONS
from remix_megatron.config import AlgorithmConfig, ExperimentConfig
from remix_megatron.parallel import ParallelState
from remix_megatron.store import Trajectory


@dataclass(frozen=True)
class PackedRows:
    """Right-padded ``[b, w]`` tensors of ``b`` trajectories (``lengths`` is ``[b]``)."""

    tokens: torch.Tensor  # long: input token ids (pad 0)
    labels: torch.Tensor  # long: the token emitted at each position
    mask: torch.Tensor  # float: 1 on the response tokens that count (0 on padding rows)
    behaviour: torch.Tensor  # float: the generating policy's log-probs (recomputed at collection)
    collected_values: torch.Tensor  # float: the critic's values when the sample was collected (0 without one)
    rewards: torch.Tensor  # float: the outcome, on the last response token
    engine: torch.Tensor | None  # float: the engine's sampling log-probs (None unless every record has them)
    lengths: torch.Tensor  # long [b]: positions each row needs, prompt + response - 1, before any cut
    seq_length: int  # the cap on the width (trainer.seq_length)
    multiple: int  # widths are multiples of this

    @property
    def width(self) -> int:
        return self.tokens.size(1)

    def select(self, rows: Sequence[int]) -> "PackedRows":
        """These rows (repeats allowed), at the width their own packing would have: equal to
        ``pack`` of those records, so a forward on them computes exactly what it would there."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        lengths = self.lengths[index]
        width = _width(int(lengths.max()) if len(index) else 1, self.seq_length, self.multiple)
        cut = lambda t: None if t is None else t[index, :width].clone()  # noqa: E731
        return PackedRows(tokens=cut(self.tokens), labels=cut(self.labels), mask=cut(self.mask),
                          behaviour=cut(self.behaviour), collected_values=cut(self.collected_values),
                          rewards=cut(self.rewards), engine=cut(self.engine), lengths=lengths,
                          seq_length=self.seq_length, multiple=self.multiple)

    def micro_batches(self, size: int, *, actor: ActorLossInputs | None = None,
                      critic: CriticTargets | None = None) -> list[MicroBatch]:
        return split_micro_batches(self.tokens, self.labels, size, actor=actor, critic=critic)


def _width(longest: int, seq_length: int, multiple: int) -> int:
    return min(seq_length, -(-longest // multiple) * multiple)


def pack(records: list[Trajectory], seq_length: int, *, pad_id: int = 0, multiple: int = 8) -> PackedRows:
    """Right-padded rows of ``records``; the width is the longest record rounded up to ``multiple``,
    at most ``seq_length``: a batch of short responses pays nothing for the longest possible one.
    A response longer than the width is cut there (its reward goes on the last kept token)."""
    b = len(records)
    lengths = torch.tensor([r.prompt_tokens.size + r.response_length - 1 for r in records], dtype=torch.long)
    width = _width(int(lengths.max()) if b else 1, seq_length, multiple)
    tokens = torch.full((b, width + 1), pad_id, dtype=torch.long)
    fields = {name: torch.zeros(b, width) for name in ("mask", "behaviour", "collected_values", "rewards", "engine")}
    for row, record in enumerate(records):
        sequence = np.concatenate([record.prompt_tokens, record.response_tokens])[: width + 1]
        tokens[row, : sequence.size] = torch.from_numpy(sequence.astype(np.int64))
        span = response_spans([record], width)[0]
        kept = span.stop - span.start
        if kept == 0:
            continue
        fields["mask"][row, span] = 1.0
        fields["behaviour"][row, span] = torch.from_numpy(record.behaviour_logprobs[:kept])
        if record.values is not None:
            fields["collected_values"][row, span] = torch.from_numpy(record.values[:kept])
        if record.engine_logprobs is not None:
            fields["engine"][row, span] = torch.from_numpy(record.engine_logprobs[:kept])
        fields["rewards"][row, span.stop - 1] = record.reward
    if b == 0 or any(r.engine_logprobs is None for r in records):
        fields["engine"] = None
    return PackedRows(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), lengths=lengths,
                      seq_length=seq_length, multiple=multiple, **fields)


def response_spans(records: list[Trajectory], width: int) -> list[slice]:
    """Where each record's (kept) response tokens sit in a packed row of ``width`` positions."""
    out = []
    for record in records:
        start = record.prompt_tokens.size - 1
        out.append(slice(start, start + max(min(record.response_length, width - start), 0)))
    return out


def pack_multiple(state: ParallelState) -> int:
    """Packed widths are multiples of 8 and of TP (sequence parallelism splits the sequence over TP)."""
    return math.lcm(8, state.tensor_parallel)


def micro_batch_group(state: ParallelState) -> int:
    """Micro-batches per pipeline run come in multiples of this: with interleaving (VPP > 1)
    Megatron's schedule takes only multiples of PP (and at least PP)."""
    return state.pipeline_parallel if state.virtual_pipeline > 1 else 1


def padded_count(real: int, multiple: int, minimum: int = 0) -> int:
    """Rows after padding ``real`` up to a multiple of ``multiple``, and to at least ``minimum``."""
    return max(real + (-real % multiple), minimum)


def pad_rows(records: list, multiple: int, minimum: int = 0) -> tuple[list, int]:
    """Repeat the last record until the count is a multiple, and at least ``minimum`` (the copies are masked out)."""
    real = len(records)
    return records + [records[-1]] * (padded_count(real, multiple, minimum) - real), real


# ------------------------------------------------------------------------------ token-budget micro-batches


# A micro-batch stops growing where its padding would pass this share of its real tokens: the
# budget alone would put many short rows behind one longer one (a long tail pads ~1.3x even
# sorted); with it padded/real <= 1 + PADDING_SLACK per micro-batch, for more, smaller ones.
PADDING_SLACK = 0.1


def token_budget_groups(widths: Sequence[int], budget: int, count: int = 1, *, packed: bool = False) -> list[list[int]]:
    """Positions of rows of these ``widths`` grouped into micro-batches whose tokens stay within
    ``budget``: padded (rows x the widest, and within ``1 + PADDING_SLACK`` of their real tokens),
    or ``packed`` end to end (their sum). Rows go longest first, each micro-batch a run of that
    order (runs of sorted rows pad least), a row wider than the budget alone; then the costliest
    micro-batch of several rows is halved until there are ``count``."""
    def cost(rows: list[int]) -> int:
        return sum(widths[i] for i in rows) if packed else len(rows) * widths[rows[0]]

    groups: list[list[int]] = []
    for row in sorted(range(len(widths)), key=lambda i: -widths[i]):
        grown = groups[-1] + [row] if groups else [row]
        real = sum(widths[i] for i in grown)
        if groups and cost(grown) <= budget and (packed or cost(grown) <= (1 + PADDING_SLACK) * real):
            groups[-1] = grown
        else:
            groups.append([row])
    while len(groups) < count and any(len(group) > 1 for group in groups):
        costliest = max((i for i, g in enumerate(groups) if len(g) > 1), key=lambda i: cost(groups[i]))
        group = groups.pop(costliest)
        groups[costliest:costliest] = [group[: len(group) // 2], group[len(group) // 2:]]
    return groups


def loss_widths(mask: torch.Tensor, multiple: int) -> list[int]:
    """``[b, w]`` mask -> the positions each row needs: through its last token in the mask, rounded
    up to ``multiple`` (at most ``w``); 0 for a row without any."""
    last = (torch.arange(1, mask.size(1) + 1) * (mask > 0)).max(dim=1).values
    return [min(-(-int(n) // multiple) * multiple, mask.size(1)) for n in last]


def budget_micro_batches(whole: MicroBatch, widths: Sequence[int], budget: int, count: int = 1, group: int = 1,
                         packed: int = 0) -> tuple[list[MicroBatch], list[int]]:
    """The rows of ``whole`` regrouped under the token budget, each micro-batch cut to its widest
    row's ``widths``, or with ``packed`` (a multiple for the packed length, TP's) each micro-batch
    its rows' ``widths`` positions end to end (THD); rows of width 0 (nothing to compute) are
    left out. Returns at least ``count`` micro-batches, a multiple of ``group`` (silent copies
    where the rows do not split that far), and the row of ``whole`` behind each of their rows."""
    kept = [row for row, width in enumerate(widths) if width > 0]
    if not kept:  # nothing to learn or compute: one silent micro-batch keeps the schedule whole
        return [masked(whole.take([0], whole.tokens.size(1)))] * padded_count(max(count, 1), group), []
    groups = [[kept[i] for i in part]
              for part in token_budget_groups([widths[row] for row in kept], budget, count, packed=bool(packed))]
    out = [whole.take(rows, widths[rows[0]]) for rows in groups]
    if packed:
        out = [batch.packed([widths[row] for row in rows], packed) for batch, rows in zip(out, groups)]
    # the count first, then whole groups: ranks that split to ``count`` and ranks that could not end equal
    out += [masked(out[-1])] * (padded_count(max(len(out), count), group) - len(out))
    return out, [row for rows in groups for row in rows]


def scatter_rows(computed: torch.Tensor, order: list[int], rows: int, width: int) -> torch.Tensor:
    """``[rows, width]``: row ``order[i]`` is ``computed[i]`` (0 where it has no value, past its
    width, or not in order)."""
    out = torch.zeros(rows, width)
    out[order, :computed.size(1)] = computed[:len(order)].cpu().float()
    return out


def budget_minibatches(parts: list[list[MicroBatch]], budget: int, multiple: int, state: ParallelState, *,
                       packed: bool = False, balance: bool = False) -> list[list[MicroBatch]]:
    """Each minibatch's rows (those of its fixed-size micro-batches) regrouped under the token
    budget; with ``balance`` first moved between DP ranks so each trains about the same number of
    tokens (``balance_plan``; the gradient is the same: the loss is normalised over every DP rank).
    Every DP rank gets the same number of micro-batches per minibatch, the most any rank needs,
    spread by halving its costliest ones (a multiple of the interleaved schedule's group)."""
    wholes = [MicroBatch.concat(part) for part in parts]
    widths = [loss_widths(_loss_mask(whole), 1 if packed else multiple) for whole in wholes]
    if balance and state.data_parallel > 1:
        plans, everyone = balanced_plans(widths, state)
        wholes = exchange_rows(wholes, plans, state)
        widths = [[everyone[src][m][i] for src, i in plan[state.dp_rank]] for m, plan in enumerate(plans)]
    counts = torch.tensor([len(token_budget_groups([w for w in row_widths if w], budget, packed=packed))
                           for row_widths in widths])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=state.dp_group)
    group = micro_batch_group(state)
    return [budget_micro_batches(whole, row_widths, budget, int(count), group, multiple if packed else 0)[0]
            for whole, row_widths, count in zip(wholes, widths, counts)]


def _loss_mask(batch: MicroBatch) -> torch.Tensor:
    return (batch.actor if batch.actor is not None else batch.critic).loss_mask


def budget_forwards(forwards: Sequence[Callable[[list[MicroBatch]], torch.Tensor]], whole: MicroBatch,
                    mask: torch.Tensor, budget: int, multiple: int, state: ParallelState, *, group: int = 1,
                    packed: bool = False, balance: bool = False) -> list[torch.Tensor]:
    """Each forward-only pass of ``forwards`` on the rows of ``whole`` in token-budget micro-batches
    (row widths from ``mask``), as ``[rows, width]`` (0 past each row's width). With ``balance``
    the rows are first spread over the DP ranks as for training (``balance_plan``), computed
    where they land, and their results sent back to the rank that holds them."""
    rows, width = mask.shape
    widths = loss_widths(mask, 1 if packed else multiple)
    if not balance or state.data_parallel == 1:
        micro, order = budget_micro_batches(whole, widths, budget, 1, group, multiple if packed else 0)
        return [scatter_rows(forward(micro), order, rows, width) for forward in forwards]
    (plan,), everyone = balanced_plans([widths], state)
    (mine,) = exchange_rows([whole], [plan], state)
    me = state.dp_rank
    mine_widths = [everyone[src][0][i] for src, i in plan[me]]
    micro, order = budget_micro_batches(mine, mine_widths, budget, 1, group, multiple if packed else 0)
    computed = [scatter_rows(forward(micro), order, len(mine_widths), mine.tokens.size(1)) for forward in forwards]
    # each source rank's rows computed here, as (its row indices, the results); other ranks' go back to them
    positions: dict[int, list[int]] = {}
    for position, (src, _) in enumerate(plan[me]):
        positions.setdefault(src, []).append(position)
    results = {src: ([plan[me][p][1] for p in ps], [c[ps] for c in computed]) for src, ps in positions.items()}
    returned: list = [None] * state.data_parallel
    dist.all_gather_object(returned, {src: r for src, r in results.items() if src != me}, group=state.dp_group)
    out = [torch.zeros(rows, width) for _ in forwards]
    for indices, tensors in (results.get(me, ([], [])), *(other.get(me, ([], [])) for other in returned)):
        for o, c in zip(out, tensors):
            n = min(width, c.size(1))
            o[indices, :n] = c[:, :n]
    return out


# ------------------------------------------------------------------------------ balancing DP ranks


def balance_plan(widths: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    """Which rows each DP rank takes so that their tokens even out, moving few rows; ``widths[r]``
    are rank ``r``'s rows' token counts. A rank above the mean gives away, largest first, each row
    whose removal brings it closer to the mean (rows without tokens stay); the rows given away
    go, longest first, each to the rank with the fewest tokens at that point. Returns, per rank,
    ``(source rank, row)`` of its rows: its own kept rows in order, then those it receives. A
    pure function of ``widths``, so every rank computes the same plan."""
    ranks = len(widths)
    loads = [float(sum(w)) for w in widths]
    target = sum(loads) / ranks
    kept = [set(range(len(w))) for w in widths]
    pool = []
    for r in range(ranks):
        for i in sorted(range(len(widths[r])), key=lambda i: (-widths[r][i], i)):
            width = widths[r][i]
            if 0 < width < 2 * (loads[r] - target):  # |load - target| shrinks
                kept[r].discard(i)
                loads[r] -= width
                pool.append((width, r, i))
    received: list[list[tuple[int, int]]] = [[] for _ in range(ranks)]
    for width, r, i in sorted(pool, key=lambda item: (-item[0], item[1], item[2])):
        to = min(range(ranks), key=lambda q: (loads[q], q))
        loads[to] += width
        received[to].append((r, i))
    return [[(r, i) for i in sorted(kept[r])] + received[r] for r in range(ranks)]


def balanced_plans(widths: list[list[int]], state: ParallelState) -> tuple[list, list]:
    """``balance_plan`` of each minibatch over the DP ranks, from this rank's ``widths[m]`` (one
    list per minibatch); also every rank's widths (``everyone[rank][m][row]``)."""
    everyone: list = [None] * state.data_parallel
    dist.all_gather_object(everyone, widths, group=state.dp_group)
    return [balance_plan([everyone[r][m] for r in range(state.data_parallel)]) for m in range(len(widths))], everyone


def exchange_rows(wholes: list[MicroBatch], plans: list, state: ParallelState) -> list[MicroBatch]:
    """Per minibatch ``m``, the rows ``plans[m][this rank]`` in that order, each from the rank
    that holds it (one all-gather of the rows that move), at the widest of their widths; a rank
    left with none gets a silent copy of one of its rows."""
    me, ranks = state.dp_rank, state.data_parallel
    outgoing = []
    for whole, plan in zip(wholes, plans):
        given = sorted({i for r in range(ranks) if r != me for src, i in plan[r] if src == me})
        outgoing.append((given, whole.take(given, whole.tokens.size(1)) if given else None))
    gathered: list = [None] * ranks
    dist.all_gather_object(gathered, outgoing, group=state.dp_group)
    out = []
    for m, (whole, plan) in enumerate(zip(wholes, plans)):
        pieces = []
        for src, i in plan[me]:
            if src == me:
                pieces.append(whole.take([i], whole.tokens.size(1)))
            else:
                given, moved = gathered[src][m]
                pieces.append(moved.take([given.index(i)], moved.tokens.size(1)))
        if not pieces:
            out.append(masked(whole.take([0], whole.tokens.size(1))))
            continue
        width = max(piece.tokens.size(1) for piece in pieces)
        out.append(MicroBatch.concat([piece.widened(width) for piece in pieces]))
    return out


# ------------------------------------------------------------------------------ the mixed batch


@dataclass(frozen=True)
class TrainingBatch:
    """One rank's mixed batch of iteration k, packed once.

    Rows are the sampled trajectories in a seeded random order, then masked copies of the last
    one (``rows.mask`` is 0 there) up to whole micro-batches and at least one micro-batch per
    optimizer step."""

    records: list[Trajectory]  # b, in row order (copies after ``real``)
    real: int  # rows that are real samples
    ages: torch.Tensor  # long [b]: iterations since each sample was generated (0 = fresh)
    rows: PackedRows
    steps: int  # optimizer steps per UTD pass (the all-rank batch in minibatches of global_batch_size)

    @staticmethod
    def pack(k: int, trajectories: list[Trajectory], ages: np.ndarray, *, seed: int, micro_batch_size: int,
             global_batch_size: int, seq_length: int, state: ParallelState) -> "TrainingBatch":
        steps = minibatch_steps(len(trajectories), global_batch_size, state)
        order = np.random.default_rng([seed, k, state.dp_rank]).permutation(len(trajectories))
        records, real = pad_rows([trajectories[i] for i in order], micro_batch_size,
                                 minimum=steps * micro_batch_size)
        shuffled = ages[order]
        row_ages = torch.from_numpy(np.concatenate([shuffled, np.full(len(records) - real, shuffled[-1])]))
        rows = pack(records, seq_length, multiple=pack_multiple(state))
        rows.mask[real:] = 0.0
        return TrainingBatch(records=records, real=real, ages=row_ages, rows=rows, steps=steps)

    def group_outcomes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """GRPO's inputs, ``[b]``: each row's reward (the stored one: a response cut to nothing
        still has it) and its group. A group is one prompt of one iteration: the key is
        ``iteration * 1_000_000 + group_id`` (group ids count prompts within an iteration, far
        below a million), so the same prompt drawn at two iterations forms two groups. The
        padding copies get groups of their own (negative keys), so they do not enter the mean
        and std of the group they copy."""
        scores = torch.tensor([r.reward for r in self.records], dtype=torch.float64)
        group_ids = torch.tensor([r.iteration * 1_000_000 + r.group_id if i < self.real else -1 - i
                                  for i, r in enumerate(self.records)])
        return scores, group_ids

    def stored_advantages(self) -> torch.Tensor | None:
        """``[b]`` the GRPO advantage each sample got in its own group at collection (None if not stored)."""
        if any("grpo_advantage" not in r.extra for r in self.records):
            return None
        return torch.tensor([r.extra["grpo_advantage"] for r in self.records], dtype=torch.float32)


def minibatch_steps(local_rows: int, global_batch_size: int, state: ParallelState) -> int:
    """Optimizer steps per UTD pass: the whole (all-rank) batch in minibatches of ``global_batch_size``."""
    total = torch.tensor([local_rows], dtype=torch.int64)
    dist.all_reduce(total, group=state.dp_group)
    return max(1, math.ceil(int(total.item()) / global_batch_size))


@dataclass(frozen=True)
class PolicyForwards:
    """Forward-only results on a ``TrainingBatch``, ``[b, w]``, 0 outside the loss mask."""

    pik: torch.Tensor  # pi_k (the actor as the iteration starts) on the sampled tokens
    ref: torch.Tensor | None  # the reference policy (None: not run, nothing uses it)
    prev: torch.Tensor | None  # the precedent policy pi_{k-1} (None: not run)
    values: torch.Tensor | None  # the critic's values as the iteration starts (None without a critic)


def rows_forward(forward: Callable[[list[MicroBatch]], torch.Tensor], rows: PackedRows, needed: torch.Tensor,
                 known: torch.Tensor, micro_batch_size: int, group: int, max_tokens: int = 0,
                 packed: bool = False, state: ParallelState | None = None, balance: bool = False) -> torch.Tensor:
    """``known`` with the rows where ``needed`` replaced by ``forward`` of those rows only; 0
    outside the mask. The needed rows are selected from the packing (same positions) and padded
    to whole micro-batches (a multiple of ``group``), or grouped under ``max_tokens`` when set
    (``packed``: end to end; ``balance``: spread over the DP ranks, see ``budget_forwards``);
    nothing runs when none is needed (rows without loss tokens, the padding copies, never are).
    With ``balance`` every DP rank must call it (it exchanges rows), none needed or not."""
    mask = rows.mask
    index = (needed & (mask.sum(-1) > 0)).nonzero().flatten().tolist()
    out = known * mask
    balance = balance and max_tokens > 0 and state is not None and state.data_parallel > 1
    if not index and not balance:
        return out
    if max_tokens:
        selected = rows.select(index or [0])
        selected_mask = selected.mask if index else torch.zeros_like(selected.mask)  # nothing of its own to compute
        (computed,) = budget_forwards([forward], selected.micro_batches(len(selected.mask))[0], selected_mask,
                                      max_tokens, rows.multiple, state, group=group, packed=packed, balance=balance)
        if index:
            width = selected.width
            out[index, :width] = computed[:, :width] * mask[index, :width]
        return out
    padded, real = pad_rows(index, micro_batch_size * group)
    computed = forward(rows.select(padded).micro_batches(micro_batch_size)).cpu().float()
    width = computed.size(1)
    out[index, :width] = computed[:real] * mask[index, :width]
    return out


def batch_forwards(batch: TrainingBatch, *, actor: Sequence, ref: Sequence | None, prev: Sequence | None,
                   critic: Sequence | None, micro_batch_size: int, state: ParallelState,
                   reuse_known: bool = True, max_tokens: int = 0, packed: bool = False,
                   balance: bool = False) -> PolicyForwards:
    """pi_k, reference and precedent log-probs and critic values on the batch (model chunks
    given; a model passed as None is not run: its loss weight is 0 and no metric asks for it).

    Passes whose result is already known are skipped (``reuse_known``): pi_k on fresh rows is
    their behaviour log-prob (pi_k generated them; w = 1 exactly); pi_{k-1} on rows of age 1 is
    their behaviour log-prob too (pi_{k-1} generated them and ``prev`` holds pi_{k-1}); the
    critic has not moved since it valued this iteration's fresh rows, so their values are the
    collected ones. Only the reference runs on every row.
    """
    rows, ages = batch.rows, batch.ages
    everything = torch.ones_like(ages, dtype=torch.bool)
    replayed = ages > 0 if reuse_known else everything  # pi_k and the critic: fresh rows are known
    not_age1 = ages != 1 if reuse_known else everything  # pi_{k-1}: age-1 rows are known
    group = micro_batch_group(state)

    def run(chunks, needed, known, values: bool = False):
        if values:
            forward = lambda micro: forward_values(chunks, micro, state)  # noqa: E731
        else:
            forward = lambda micro: forward_logprobs(chunks, micro, state)[0]  # noqa: E731
        return rows_forward(forward, rows, needed, known, micro_batch_size, group, max_tokens, packed, state, balance)

    return PolicyForwards(
        pik=run(actor, replayed, rows.behaviour),
        ref=run(ref, everything, torch.zeros_like(rows.mask)) if ref is not None else None,
        prev=run(prev, not_age1, rows.behaviour) if prev is not None else None,
        values=run(critic, replayed, rows.collected_values, values=True) if critic is not None else None)


def single_on_policy_pass(current: Phase, fresh_rows: int, cfg: ExperimentConfig) -> bool:
    """Whether this iteration trains pi_k's own fresh samples (``fresh_rows`` over all ranks) in
    one optimizer step and nothing will ever replay them: then the training forward gives their
    behaviour log-probs and the recompute pass at collection is skipped
    (``trainer.reuse_training_forward``). Not with a critic (its values are taken in that pass)
    or a mismatch correction (it weighs the engine's log-probs against the trainer's)."""
    alg = cfg.algorithm
    never_replayed = current.off_policy_portion == 0 and (current.reincarnated or alg.off_policy_portion == 0)
    return (cfg.trainer.reuse_training_forward and never_replayed and current.utd == 1
            and fresh_rows <= cfg.trainer.global_batch_size and not needs_critic(alg.advantage_estimator)
            and alg.mismatch_correction == "none")


def recompute_behaviour(records: list[Trajectory], *, actor: Sequence, critic: Sequence | None,
                        micro_batch_size: int, seq_length: int, state: ParallelState, max_tokens: int = 0,
                        packed: bool = False, balance: bool = False
                        ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The actor's log-probs (and the critic's values) on each record's kept response tokens
    (in micro-batches of ``micro_batch_size`` rows, or under ``max_tokens`` when set, ``packed``
    end to end, ``balance``: spread over the DP ranks, see ``budget_forwards``)."""
    if not records:
        return [], ([] if critic is not None else None)
    if max_tokens:
        rows = pack(records, seq_length, multiple=pack_multiple(state))
        forwards = [lambda micro: forward_logprobs(actor, micro, state)[0]]
        if critic is not None:
            forwards.append(lambda micro: forward_values(critic, micro, state))
        computed = budget_forwards(forwards, rows.micro_batches(len(records))[0], rows.mask, max_tokens,
                                   rows.multiple, state, group=micro_batch_group(state), packed=packed,
                                   balance=balance)
        logprobs, values = computed[0], computed[1] if critic is not None else None
    else:
        padded, _ = pad_rows(records, micro_batch_size * micro_batch_group(state))
        micro = pack(padded, seq_length, multiple=pack_multiple(state)).micro_batches(micro_batch_size)
        logprobs, _ = forward_logprobs(actor, micro, state)
        values = forward_values(critic, micro, state) if critic is not None else None
    spans = response_spans(records, seq_length)
    behaviour = [logprobs[i, span].cpu().numpy() for i, span in enumerate(spans)]
    return behaviour, None if values is None else [values[i, span].cpu().numpy() for i, span in enumerate(spans)]


# ------------------------------------------------------------------------------ micro-batches and minibatches


def global_whiten(advantages: torch.Tensor, mask: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Whiten over the valid tokens of the whole (all-DP) batch."""
    stats = torch.stack([(advantages * mask).sum(), (advantages ** 2 * mask).sum(), mask.sum()]).double()
    dist.all_reduce(stats, group=state.dp_group)
    mean = stats[0] / stats[2].clamp(min=1)
    var = (stats[1] / stats[2].clamp(min=1) - mean ** 2) * stats[2] / (stats[2] - 1).clamp(min=1)
    return ((advantages - mean) / (var.clamp(min=0).sqrt() + 1e-8)).float() * mask


def masked(batch: MicroBatch) -> MicroBatch:
    """A copy of ``batch`` that contributes nothing: no loss tokens, so no loss, gradient,
    token count or metric (padding for the interleaved schedule)."""
    silent = lambda record: None if record is None else replace(record, loss_mask=torch.zeros_like(record.loss_mask))  # noqa: E731
    return replace(batch, actor=silent(batch.actor), critic=silent(batch.critic))


def minibatches(micro_batches: list, steps: int, seed: Sequence[int], group: int = 1) -> list[list]:
    """The micro-batches in a seeded random order, cut into ``steps`` nearly equal minibatches;
    each is padded with masked copies to a multiple of ``group`` micro-batches (the same rows
    train in each minibatch whatever the layout)."""
    order = (np.random.default_rng(list(seed)).permutation(len(micro_batches)) if steps > 1
             else range(len(micro_batches)))
    shuffled = [micro_batches[i] for i in order]
    bounds = np.linspace(0, len(shuffled), steps + 1).round().astype(int)
    cut = [shuffled[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [part + [masked(part[-1])] * (-len(part) % group) for part in cut]


def estimate_advantages(batch: TrainingBatch, forwards: PolicyForwards, alg: AlgorithmConfig,
                        state: ParallelState) -> AdvantageOutput:
    """The configured estimator on the batch; whitening (where it applies) spans every DP rank."""
    scores, group_ids = batch.group_outcomes()
    rows = batch.rows
    return ADVANTAGE_ESTIMATORS.get(alg.advantage_estimator)(AdvantageInputs(
        rewards=rows.rewards, mask=rows.mask, values=forwards.values, pik_logprobs=forwards.pik,
        behaviour_logprobs=rows.behaviour, scores=scores, group_ids=group_ids,
        stored_advantages=batch.stored_advantages(),
        whitener=lambda advantages, mask: global_whiten(advantages, mask, state)), alg)


def _fp32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu().float()


def mismatch_weights(rows: PackedRows, alg: AlgorithmConfig) -> torch.Tensor | None:
    """The per-token engine/trainer mismatch weights of ``algorithm.mismatch_correction`` (None: off)."""
    weigh = MISMATCH_CORRECTIONS.get(alg.mismatch_correction)
    if rows.engine is None and alg.mismatch_correction != "none":
        raise ValueError(f"algorithm.mismatch_correction={alg.mismatch_correction} needs the engine's sampling "
                         "log-probs, and some trajectories of this batch have none (an engine that does not return "
                         "them, or a store written before they were kept)")
    return weigh(rows.behaviour, rows.engine, rows.mask, cap=alg.mismatch_cap, level=alg.mismatch_level)


def training_micro_batches(batch: TrainingBatch, forwards: PolicyForwards, estimate: AdvantageOutput,
                           micro_batch_size: int, alg: AlgorithmConfig
                           ) -> tuple[list[MicroBatch], list[MicroBatch] | None]:
    """The actor's micro-batches with their loss inputs, and the critic's (None without a critic)."""
    rows = batch.rows
    actor_inputs = ActorLossInputs(loss_mask=rows.mask, advantages=estimate.advantages.float(),
                                   behaviour_logprobs=rows.behaviour, pik_logprobs=forwards.pik.float(),
                                   ref_logprobs=_fp32(forwards.ref), prev_logprobs=_fp32(forwards.prev),
                                   sample_age=batch.ages, mismatch_weights=mismatch_weights(rows, alg))
    actor = rows.micro_batches(micro_batch_size, actor=actor_inputs)
    if forwards.values is None or estimate.returns is None:
        return actor, None
    # The clip centre is the critic as this iteration starts (its trust region), on every row:
    # for fresh rows that is their collected value; for replayed rows the value collected with
    # them is up to N critics old, and a window around it can hold the loss on its clipped,
    # gradient-free side while V-trace's targets come from the current critic.
    targets = CriticTargets(loss_mask=rows.mask, old_values=forwards.values.float(), returns=estimate.returns.float())
    return actor, rows.micro_batches(micro_batch_size, critic=targets)
