"""Per-response checks and the score arithmetic of the paper's evaluation table.

- pass@1 (greedy): the share of problems whose one greedy response is correct.
- avg@k: k sampled responses per problem; the mean over problems of (correct / k). It
  estimates the expected pass@1 of sampling, with less variance than one sample.
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), reported
  beside avg@k when k > 1.
- Format correctness: the response's reasoning is wrapped in exactly one paired
  ``<think>...</think>`` (the opening tag may sit in the prompt, as R1-style chat templates
  put it there).
- Self-reflection: the response contains one of the paper's reflection words as a word.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REFLECTION_WORDS = ("wait", "verify", "check", "re-examine", "confirm", "but")
_REFLECTION = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in REFLECTION_WORDS) + r")(?![\w-])",
                         re.IGNORECASE)


def format_correct(response: str, *, opened: bool = False) -> bool:
    """One ``<think>`` followed later by one ``</think>``; ``opened``: the prompt already opened it."""
    text = (THINK_OPEN if opened else "") + response
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    return text.index(THINK_OPEN) < text.index(THINK_CLOSE)


def prompt_opens_think(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves a ``<think>`` open for the response to close."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def self_reflection(response: str) -> bool:
    """Whether the response uses a reflection word (whole words, any case)."""
    return _REFLECTION.search(response) is not None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (needs k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    product = 1.0
    for m in range(n - c + 1, n + 1):
        product *= 1.0 - k / m
    return 1.0 - product


def avg_at_k(correct_per_problem: Iterable[Sequence[bool]]) -> float:
    """Mean over problems of the share of correct samples (avg@k; pass@1 when k = 1)."""
    shares = [sum(map(bool, samples)) / len(samples) for samples in correct_per_problem if len(samples)]
    if not shares:
        raise ValueError("avg@k of no problems")
    return sum(shares) / len(shares)
