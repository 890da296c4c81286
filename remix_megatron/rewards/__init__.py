"""Rewards: a registry of verifiers (name -> factory), math grading built in.

A verifier is called with the decoded responses and their reference answers and returns
one score per response plus batch statistics; a task brings its own by registering it.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from remix_megatron.registry import Registry
from remix_megatron.rewards.math import GradeStats, MathGrader, answer_region, boxed_answers, last_boxed


class Verifier(Protocol):
    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> tuple[list[float], GradeStats]: ...


REWARDS: Registry[Callable[..., Verifier]] = Registry("reward")
REWARDS.register("math", MathGrader)

__all__ = ["REWARDS", "GradeStats", "MathGrader", "Verifier", "answer_region", "boxed_answers", "last_boxed"]
