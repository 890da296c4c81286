"""Loss metrics as mergeable partial statistics.

A loss returns, per micro-batch, ``Mean(total, count)``, ``Max(value)`` and ``Min(value)`` entries.
They merge exactly across micro-batches here and across data-parallel ranks in the Megatron
adapter (sums and counts all-reduced with SUM, extrema with MAX / MIN), so a logged mean is the
mean over every token of the global batch, however it was split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Union

import torch


@dataclass(frozen=True)
class Mean:
    total: torch.Tensor  # 0-d, sum of the values
    count: torch.Tensor  # 0-d, how many values

    @staticmethod
    def of(values: torch.Tensor, mask: torch.Tensor) -> "Mean":
        mask = mask.to(values.dtype)
        return Mean(total=(values.detach() * mask).sum(), count=mask.sum())


@dataclass(frozen=True)
class Max:
    value: torch.Tensor  # 0-d; -inf when nothing was observed

    @staticmethod
    def of(values: torch.Tensor, mask: torch.Tensor) -> "Max":
        masked = torch.where(mask.bool(), values.detach(), torch.full_like(values, -torch.inf))
        return Max(value=masked.max() if masked.numel() else torch.tensor(-torch.inf))


@dataclass(frozen=True)
class Min:
    value: torch.Tensor  # 0-d; +inf when nothing was observed

    @staticmethod
    def of(values: torch.Tensor, mask: torch.Tensor) -> "Min":
        return Min(value=-Max.of(-values, mask).value)


Metric = Union[Mean, Max, Min]


def merge(parts: Iterable[Mapping[str, Metric]]) -> dict[str, Metric]:
    """Combine per-micro-batch metrics (same keys in each)."""
    merged: dict[str, Metric] = {}
    for part in parts:
        for key, metric in part.items():
            previous = merged.get(key)
            if previous is None:
                merged[key] = metric
            elif isinstance(metric, Mean):
                merged[key] = Mean(total=previous.total + metric.total, count=previous.count + metric.count)
            elif isinstance(metric, Max):
                merged[key] = Max(value=torch.maximum(previous.value, metric.value))
            else:
                merged[key] = Min(value=torch.minimum(previous.value, metric.value))
    return merged


def finalize(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """Plain numbers; means with no observations and extrema of nothing are left out."""
    out = {}
    for key, metric in metrics.items():
        if isinstance(metric, Mean):
            if metric.count.item() > 0:
                out[key] = (metric.total / metric.count).item()
        elif torch.isfinite(metric.value):
            out[key] = metric.value.item()
    return out
