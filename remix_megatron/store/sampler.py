"""The mixed on/off-policy sampler: fresh groups from iteration k plus replayed ones.

For iteration k and off-policy portion p (0 after reincarnation) a batch holds
``fresh = fresh_prompts(B, p, multiple_of)`` groups generated at k and ``B - fresh`` groups
replayed from the published iterations k-N .. k-1, chosen without replacement, uniformly
over the window's groups or with weight ``age_decay ** (age - 1)``. A group is every
response to one prompt in one iteration (one response for PPO, n for GRPO) and is always
taken whole. When the window holds fewer groups than asked (the first iterations),
``shortage="take_all"`` takes them all and logs a warning (the batch is smaller);
``"fill_fresh"`` asks for that many more fresh prompts instead (see ``fresh_to_generate``).

Everything is a function of (seed, k): the same store gives the same batch on every rank
and after a resume, so the sampler's checkpoint state is only its settings. Each DP rank
reads just the rows of its own groups (memory O(batch), not O(store)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from remix_megatron.algorithms.schedules import fresh_prompts
from remix_megatron.config.schema import REPLAY_SHORTAGE as SHORTAGE_POLICIES
from remix_megatron.registry import Registry
from remix_megatron.store.record import Trajectory
from remix_megatron.store.store import TrajectoryStore

logger = logging.getLogger(__name__)

#: name -> f(ages [groups] in iterations (>= 1), age_decay) -> sampling weights [groups], or None for uniform
ReplayWeighting = Callable[[np.ndarray, float], "np.ndarray | None"]
REPLAY_WEIGHTINGS: Registry[ReplayWeighting] = Registry("replay weighting")
# None, not equal weights: numpy's choice draws differently with p given, and uniform runs keep their batches
REPLAY_WEIGHTINGS.register("uniform", lambda ages, age_decay: None)
REPLAY_WEIGHTINGS.register("age", lambda ages, age_decay: age_decay ** (ages - 1))


@dataclass(frozen=True)
class GroupRef:
    """Where one group's rows live: ``rows`` is a tuple of (shard index, row) pairs."""

    iteration: int
    group_id: int
    rows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MixPlan:
    iteration: int
    groups: tuple[GroupRef, ...]  # the whole batch, in its shuffled order
    num_fresh: int
    num_replayed: int
    shortfall: int  # replayed groups asked for but not available


@dataclass(frozen=True)
class SampledBatch:
    """This DP rank's share of a mixed batch."""

    trajectories: list[Trajectory]
    ages: np.ndarray  # [len(trajectories)] iterations since generation (0 = fresh)
    plan: MixPlan


class MixedSampler:
    def __init__(self, *, groups_per_step: int, window: int, fresh_multiple_of: int = 1, weighting: str = "uniform",
                 age_decay: float = 0.5, shortage: str = "take_all", seed: int = 0) -> None:
        if groups_per_step < 1 or window < 0 or fresh_multiple_of < 1:
            raise ValueError(f"groups_per_step={groups_per_step} and fresh_multiple_of={fresh_multiple_of} must be "
                             f">= 1, window={window} >= 0")
        REPLAY_WEIGHTINGS.get(weighting)  # ValueError listing the registered ones
        if shortage not in SHORTAGE_POLICIES:
            raise ValueError(f"shortage={shortage!r} is not one of {', '.join(SHORTAGE_POLICIES)}")
        if not 0 < age_decay <= 1:
            raise ValueError(f"age_decay={age_decay} must lie in (0, 1]")
        self.groups_per_step, self.window, self.fresh_multiple_of = groups_per_step, window, fresh_multiple_of
        self.weighting, self.age_decay, self.shortage, self.seed = weighting, age_decay, shortage, seed

    @classmethod
    def from_config(cls, cfg, *, groups_per_step: int) -> "MixedSampler":
        """The sampler an ``ExperimentConfig`` describes (p and N from ``algorithm``, the rest from ``store``)."""
        return cls(groups_per_step=groups_per_step, window=cfg.algorithm.replay_window,
                   fresh_multiple_of=cfg.algorithm.fresh_multiple_of, weighting=cfg.store.replay_weighting,
                   age_decay=cfg.store.replay_age_decay, shortage=cfg.store.shortage, seed=cfg.trainer.seed)

    # planning ----------------------------------------------------------------------------
    def _groups(self, store: TrajectoryStore, iteration: int) -> list[GroupRef]:
        members: dict[int, list[tuple[int, int]]] = {}
        for shard_index, group_ids in enumerate(store.group_ids(iteration)):
            for row, group in enumerate(group_ids.tolist()):
                members.setdefault(group, []).append((shard_index, row))
        return [GroupRef(iteration, group, tuple(rows)) for group, rows in sorted(members.items())]

    def _window_groups(self, store: TrajectoryStore, iteration: int) -> list[GroupRef]:
        first = max(iteration - self.window, 0)
        return [g for i in range(first, iteration) if store.is_published(i) for g in self._groups(store, i)]

    def fresh_to_generate(self, store: TrajectoryStore, iteration: int, off_policy_portion: float) -> int:
        """How many fresh prompts iteration ``iteration`` should roll out."""
        fresh = fresh_prompts(self.groups_per_step, off_policy_portion, self.fresh_multiple_of)
        if self.shortage == "fill_fresh":
            available = len(self._window_groups(store, iteration)) if fresh < self.groups_per_step else 0
            fresh += max(self.groups_per_step - fresh - available, 0)
        return fresh

    def plan(self, store: TrajectoryStore, iteration: int, off_policy_portion: float) -> MixPlan:
        """The whole mixed batch of ``iteration`` (which must be published), identical on every rank."""
        rng = np.random.default_rng([self.seed, iteration])
        fresh_target = self.fresh_to_generate(store, iteration, off_policy_portion)
        replay_target = max(self.groups_per_step - fresh_target, 0)
        fresh_pool = self._groups(store, iteration)
        if len(fresh_pool) < fresh_target:
            logger.warning("iteration %d holds %d fresh groups, %d were planned; using all", iteration,
                           len(fresh_pool), fresh_target)
        fresh_pick = rng.choice(len(fresh_pool), size=min(fresh_target, len(fresh_pool)), replace=False)
        pool = self._window_groups(store, iteration) if replay_target else []
        count = min(replay_target, len(pool))
        if count < replay_target:
            logger.warning("iteration %d: the replay window holds %d groups, %d asked; replaying %d", iteration,
                           len(pool), replay_target, count)
        ages = np.array([iteration - g.iteration for g in pool], dtype=np.float64)
        weights = REPLAY_WEIGHTINGS.get(self.weighting)(ages, self.age_decay) if pool else None
        if weights is not None:
            weights = weights / weights.sum()
        replay_pick = rng.choice(len(pool), size=count, replace=False, p=weights) if count else []
        groups = [fresh_pool[i] for i in fresh_pick] + [pool[i] for i in replay_pick]
        order = rng.permutation(len(groups))
        return MixPlan(iteration=iteration, groups=tuple(groups[i] for i in order), num_fresh=len(fresh_pick),
                       num_replayed=count, shortfall=replay_target - count)

    # reading -----------------------------------------------------------------------------
    @staticmethod
    def rank_groups(plan: MixPlan, dp_rank: int, dp_size: int) -> list[GroupRef]:
        """Rank ``dp_rank``'s groups: disjoint across ranks, together the whole batch."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside 0..{dp_size - 1}")
        return list(plan.groups[dp_rank::dp_size])

    def sample(self, store: TrajectoryStore, iteration: int, off_policy_portion: float, *, dp_rank: int = 0,
               dp_size: int = 1) -> SampledBatch:
        """Read this rank's share of the mixed batch of ``iteration``."""
        plan = self.plan(store, iteration, off_policy_portion)
        mine = self.rank_groups(plan, dp_rank, dp_size)
        wanted: dict[tuple[int, int], list[int]] = {}
        for group in mine:
            for shard, row in group.rows:
                wanted.setdefault((group.iteration, shard), []).append(row)
        for (source, shard), rows in wanted.items():  # queue every read first, then read in order
            store.prefetch_rows(source, shard, rows)
        loaded: dict[tuple[int, int, int], Trajectory] = {}
        for (source, shard), rows in wanted.items():
            for row, record in zip(rows, store.read_rows(source, shard, rows)):
                loaded[(source, shard, row)] = record
        trajectories = [loaded[(g.iteration, shard, row)] for g in mine for shard, row in g.rows]
        ages = np.array([iteration - t.iteration for t in trajectories], dtype=np.int64)
        return SampledBatch(trajectories=trajectories, ages=ages, plan=plan)

    # checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that determines future batches (they depend on (seed, k) only)."""
        return {"version": 1, "groups_per_step": self.groups_per_step, "window": self.window,
                "fresh_multiple_of": self.fresh_multiple_of, "weighting": self.weighting,
                "age_decay": self.age_decay, "shortage": self.shortage, "seed": self.seed}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MixedSampler":
        if state.get("version") != 1:
            raise ValueError(f"unknown sampler state version {state.get('version')}")
        return cls(**{k: v for k, v in state.items() if k != "version"})
