"""Math answer grading, DeepScaleR convention, with math-verify as the equivalence checker.

- Only the text after the last ``</think>`` is graded when there is one (the reasoning before
  it may quote wrong intermediate answers).
- The answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) there, braces
  matched; no box means reward 0. (math-verify's own extraction falls back to the last bare
  number, which would reward unformatted output, so we extract the box ourselves.)
- The boxed answer and the reference are equivalent if their normalised strings are equal
  (also for answers sympy cannot parse, e.g. ``\\text{(C)}``), or if math-verify (sympy) says so.
  Two plain integers (``-12``, ``007``) are compared exactly without sympy: the verdict
  math-verify gives, at a thousandth of its cost (most math answers are integers; a wrong
  integer answer was the grader's slowest common case). A reference is parsed once per grader.
- Each comparison has a timeout (math-verify's, signal based, in the main thread) so a
  pathological expression cannot hang a rank; a timeout or an error grades 0 and is counted
  (math-verify swallows its own timeouts, so one is counted when a comparison runs that long).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Sequence

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_SPACES = re.compile(r"\s+")
_INTEGER = re.compile(r"^[+-]?\d+$")


def answer_region(response: str) -> str:
    """The part of a response that is graded: after the last ``</think>`` if present."""
    cut = response.rfind("</think>")
    return response[cut + len("</think>"):] if cut >= 0 else response


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, or None."""
    start = max(text.rfind(opener) for opener in _BOX_OPENERS)
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth = 1
    for index in range(position, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[position:index]
    return None  # unbalanced: the response was cut off inside the box


def _normalise(answer: str) -> str:
    answer = answer.replace("\\!", "").replace("\\left", "").replace("\\right", "").replace("$", "")
    return _SPACES.sub("", answer).rstrip(".")


def _canonical_integer(text: str) -> str:
    """``-007`` -> ``-7``, ``+0`` -> ``0``: equal strings iff equal integers (no int(): any length)."""
    digits = text.lstrip("+-").lstrip("0") or "0"
    return f"-{digits}" if text.startswith("-") and digits != "0" else digits


@dataclass
class GradeStats:
    """Counts over a batch, for logging."""

    graded: int = 0
    correct: int = 0
    no_box: int = 0
    timeouts: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)


class MathGrader:
    """Reward 1.0 for a boxed answer equivalent to the reference, else 0.0."""

    def __init__(self, *, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s = timeout_s
        from math_verify import LatexExtractionConfig  # a required dependency; imported here to keep import cheap

        self._extraction = [LatexExtractionConfig()]
        self._gold: dict[str, list] = {}  # reference -> its math-verify parse (a dataset has few distinct ones)

    @property
    def _timeout(self) -> int:
        """math-verify's timeouts are whole seconds (signal.alarm)."""
        return max(int(round(self.timeout_s)), 1)

    def _parse(self, answer: str) -> list:
        from math_verify import parse

        return parse(f"\\boxed{{{answer}}}", extraction_config=self._extraction, parsing_timeout=self._timeout)

    def _equivalent(self, answer: str, reference: str) -> bool:
        from math_verify import verify

        normalised, expected = _normalise(answer), _normalise(reference)
        if normalised == expected:
            return True
        if _INTEGER.match(normalised) and _INTEGER.match(expected):
            return _canonical_integer(normalised) == _canonical_integer(expected)
        if reference not in self._gold:
            if len(self._gold) >= 65536:
                self._gold.clear()
            self._gold[reference] = self._parse(reference)
        gold, target = self._gold[reference], self._parse(answer)
        return bool(gold and target and verify(gold, target, timeout_seconds=self._timeout))

    def grade(self, response: str, reference: str, stats: GradeStats | None = None) -> float:
        stats = stats if stats is not None else GradeStats()
        stats.graded += 1
        answer = last_boxed(answer_region(response))
        if answer is None:
            stats.no_box += 1
            return 0.0
        start = time.monotonic()
        try:
            correct = self._equivalent(answer, reference)
        except TimeoutError:
            stats.timeouts += 1
            return 0.0
        except Exception as error:  # sympy/antlr raise many types on garbage; a reward must not crash a rank
            stats.errors += 1
            if len(stats.error_messages) < 5:
                stats.error_messages.append(f"{type(error).__name__}: {error}"[:200])
            return 0.0
        if not correct and time.monotonic() - start >= 0.9 * self._timeout:
            stats.timeouts += 1
        stats.correct += int(correct)
        return 1.0 if correct else 0.0

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> tuple[list[float], GradeStats]:
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses for {len(references)} references")
        stats = GradeStats()
        return [self.grade(r, ref, stats) for r, ref in zip(responses, references)], stats
