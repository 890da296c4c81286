"""Math answer grading, DeepScaleR convention, with math-verify as the equivalence checker.

- Only the text after the last ``</think>`` is graded when there is one (the reasoning before
  it may quote wrong intermediate answers).
- The answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) there, braces
  matched, with the boxes just before it that math-verify's own convention groups with it (fewer
  than 10 characters apart, or fewer than 70 with ``,``/``;``/and/or between and another content):
  ``\\boxed{2}, \\boxed{5}`` is the answer ``2,5``, compared as a set, and listing candidates in
  adjacent boxes does not earn a reward. No box means reward 0. (math-verify's own extraction falls
  back to the last bare number, which would reward unformatted output, so we extract boxes ourselves.)
- Before comparing, both sides are rewritten where math-verify's parser reads a correct answer
  wrongly (``latex.py``: scientific notation, thousands separators, units); digit runs split by
  spaces that are not thousands (``3 4``) are no number, equal only to the same string.
- The answer and the reference are equivalent if their normalised strings are equal
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
from dataclasses import dataclass, field, replace
from typing import Sequence

from remix_megatron.rewards.latex import is_number, rewrite, split_digits, strip_units

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_BOX_SEPARATOR = re.compile(r"\b(?:and|or)\b|,|;")  # math-verify's VALID_SEPARATOR_PATTERN
_SPACES = re.compile(r"(?<=\d)(\s+)(?=\d)|\s+")  # group 1: between digits
_INTEGER = re.compile(r"^[+-]?\d+$")
_FONT = re.compile(r"\\(?:text|mathrm|textrm|mbox|mathit|textit|mathbf|textbf)\s*\{([^{}]*)\}")


def answer_region(response: str) -> str:
    """The part of a response that is graded: after the last ``</think>`` if present."""
    cut = response.rfind("</think>")
    return response[cut + len("</think>"):] if cut >= 0 else response


def _box_at(text: str, start: int, end: int) -> tuple[str, int] | None:
    """Content and closing-brace index of the box opened at ``start``; None if it is not closed before ``end``."""
    position = text.index("{", start) + 1
    depth = 1
    for index in range(position, end):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[position:index], index
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, or None."""
    start = max(text.rfind(opener) for opener in _BOX_OPENERS)
    box = _box_at(text, start, len(text)) if start >= 0 else None
    return box[0] if box else None


def boxed_answers(text: str) -> list[str]:
    """Contents of the final answer's boxes in order, duplicates dropped: the last box and the ones before it
    that math-verify groups with it (see the module docstring); [] if there is none or it is cut off."""
    answers: list[str] = []
    end = len(text)
    while (start := max(text.rfind(opener, 0, end) for opener in _BOX_OPENERS)) >= 0:
        box = _box_at(text, start, end)
        if box is None:  # the last box is cut off, or this one encloses the boxes after it
            break
        content, close = box
        between = text[close + 1:end]
        if answers and len(between) >= 10 and (
                content == answers[0] or len(between) >= 70 or not _BOX_SEPARATOR.search(between)):
            break
        if content not in answers:
            answers.insert(0, content)
        end = start
    return answers


def _normalise(answer: str) -> str:
    """The string compared for equality: spacing, sizing, dollars and fonts (\\mathrm{SRAC} is SRAC) dropped."""
    answer = answer.replace("\\!", "").replace("\\left", "").replace("\\right", "").replace("$", "")
    answer = _FONT.sub(r"\1", answer)
    return _SPACES.sub(lambda m: " " if m[1] else "", answer).rstrip(".")  # "3 4" stays apart: it is not 34


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


@dataclass
class _Reference:
    """A reference answer prepared once per grader."""

    text: str  # rewritten, unit-free: what math-verify parses
    normalised: str
    numeric: bool  # a plain or scientific number: an answer's single-letter unit (3 m, 2 s) may be dropped
    parsed: list | None = None  # math-verify's parse, made when a comparison first needs it


class MathGrader:
    """Reward 1.0 for a boxed answer equivalent to the reference, else 0.0."""

    def __init__(self, *, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s = timeout_s
        from math_verify import LatexExtractionConfig  # a required dependency; imported here to keep import cheap

        # math-verify's unit stripping is off: its single-letter units ate variables (6m -> 6); latex.py drops units
        default = LatexExtractionConfig()
        self._extraction = [replace(default, normalization_config=replace(default.normalization_config, units=False))]
        self._references: dict[str, _Reference] = {}  # a dataset has few distinct references

    @property
    def _timeout(self) -> int:
        """math-verify's timeouts are whole seconds (signal.alarm)."""
        return max(int(round(self.timeout_s)), 1)

    def _parse(self, answer: str) -> list:
        from math_verify import parse

        return parse(f"\\boxed{{{answer}}}", extraction_config=self._extraction, parsing_timeout=self._timeout)

    def _reference(self, reference: str) -> _Reference:
        if reference not in self._references:
            if len(self._references) >= 65536:
                self._references.clear()
            text = strip_units(rewrite(reference))
            self._references[reference] = _Reference(text, _normalise(text), is_number(text))
        return self._references[reference]

    def _equivalent(self, answers: Sequence[str], reference: str) -> bool:
        """Whether the boxes' contents (several: one set) are equivalent to the reference."""
        from math_verify import verify

        gold = self._reference(reference)
        rewritten = [rewrite(answer) for answer in answers]
        # ", " not ",": math-verify reads 8,221 as the number 8221 and 8, 221 as a set
        answer = ", ".join(strip_units(text, single_letters=gold.numeric) for text in rewritten)
        normalised = _normalise(answer)
        if normalised == gold.normalised:
            return True
        if any(split_digits(text) for text in rewritten):  # no number: math-verify would read 3 4 as 7
            return False
        if _INTEGER.match(normalised) and _INTEGER.match(gold.normalised):
            return _canonical_integer(normalised) == _canonical_integer(gold.normalised)
        if gold.parsed is None:
            gold.parsed = self._parse(gold.text)
        target = self._parse(answer)
        return bool(gold.parsed and target and verify(gold.parsed, target, timeout_seconds=self._timeout))

    def grade(self, response: str, reference: str, stats: GradeStats | None = None) -> float:
        stats = stats if stats is not None else GradeStats()
        stats.graded += 1
        answers = boxed_answers(answer_region(response))
        if not answers:
            stats.no_box += 1
            return 0.0
        start = time.monotonic()
        try:
            correct = self._equivalent(answers, reference)
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
