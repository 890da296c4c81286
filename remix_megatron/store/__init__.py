"""Sharded on-disk trajectory store indexed by policy iteration, and the mixed sampler."""

from remix_megatron.store.record import FINISH_REASONS, SCHEMA_VERSION, Trajectory
from remix_megatron.store.sampler import GroupRef, MixedSampler, MixPlan, SampledBatch
from remix_megatron.store.store import IterationInfo, ShardInfo, StoreError, TrajectoryStore, open_store

__all__ = [
    "FINISH_REASONS", "SCHEMA_VERSION", "Trajectory", "GroupRef", "MixedSampler", "MixPlan", "SampledBatch",
    "IterationInfo", "ShardInfo", "StoreError", "TrajectoryStore", "open_store",
]
