"""Rewrites of an answer's LaTeX before math-verify parses it, where its parser reads a correct answer wrongly.

- Degrees: ``°`` -> ``^{\\circ}``, which math-verify reads.
- Scientific notation: ``6.1e5`` -> ``6.1\\times10^{5}`` (math-verify reads ``6.1*E*5``, E Euler's number).
  Only a digit run directly followed by ``e``/``E`` and a signed integer, with no spaces: ``2e``,
  ``e^{2}`` and ``2e - 1`` keep Euler's e.
- Whitespace inside numbers: digit groups of exactly three after a first group of one to three
  (``1 000``, ``10\\,000``) are one number; any other run of digits split by spaces (``3 4``) is
  ambiguous (math-verify reads ``3 4`` as the mixed number 3 + 4) and is flagged by ``split_digits``.
- Units: a trailing unit is dropped, math-verify's own unit stripping being off, because its list of
  units holds single letters (``t``, ``c``, ``m``, ``s``) that ate trailing variables of references
  (``\\frac{1}{\\sqrt{2}}c`` read as ``1/\\sqrt{2}``, ``6m`` as 6). Dropped are: a trailing
  ``\\text{..}``/``\\mathrm{..}`` (any head, as math-verify does), degree scales (``^\\circ C`` keeps
  ``^\\circ``), and after a plain or scientific number also primes (``^{\\prime\\prime}``, arc seconds)
  and bare units of the physical sciences (``kHz``, ``m/s``, ``cm^{-3}``); single-letter bare units
  (``m``, ``s``, ``K``) only when asked (the grader asks for an answer whose reference is a number).
"""

from __future__ import annotations

import re

_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_SPACE = r"(?:\s|\\[,;: ]|~)+"  # what LaTeX writes between the digit groups of a number
_THOUSANDS = re.compile(rf"(?<![\d.])\d{{1,3}}(?:{_SPACE}\d{{3}})+(?!\d)")
_SPACE_ONLY = re.compile(_SPACE)
_SPLIT_DIGITS = re.compile(rf"(?<!frac)(?<!frac )\d{_SPACE}\d")  # \dfrac 3 8 is a fraction, not 3 8

_NUMBER = r"[+-]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)"
_POWER_OF_TEN = r"10\s*\^\s*(?:\{\s*[+-]?\d+\s*\}|[+-]?\d)"
_NUMERIC = re.compile(rf"(?:{_NUMBER}(?:\s*(?:\\times|\\cdot)\s*{_POWER_OF_TEN})?|{_POWER_OF_TEN})")

# units that take the prefixes (kHz, cm, \mu s), other unit words, and single letters (units only when asked)
_PREFIXED = ("Hz", "eV", "m", "g", "s", "J", "W", "Pa", "V", "N", "A", "K", "L", "pc", "yr", "mol", "T")
_PREFIXES = ("k", "M", "G", "m", "n", "p", "f", "c", "\\mu ", "\\mu", "μ", "u")
_WORDS = ("erg", "ergs", "cal", "kcal", "atm", "bar", "mbar", "AU", "au", "ly", "Gyr", "Myr", "yrs", "year", "years",
          "day", "days", "hr", "hrs", "hour", "hours", "min", "mins", "minute", "minutes", "sec", "second",
          "seconds", "rad", "sr", "deg", "Hz", "eV", "Å", "\\AA", "\\mathring{A}", "mph", "kph", "Jy", "mag",
          "amu", "Torr", "torr", "ohm", "\\Omega", "feet", "ft", "inch", "inches", "miles", "mile")
_SINGLE = ("m", "s", "g", "K", "J", "W", "N", "V", "A", "L", "C", "T", "h", "d")
_MULTI = sorted({p + u for p in _PREFIXES for u in _PREFIXED} | {u for u in _PREFIXED if len(u) > 1} | set(_WORDS))


def _unit_pattern(names) -> re.Pattern:
    """A tail of unit tokens (``kHz``, ``m/s``, ``cm^{-3}``, ``kcal m^{-2} yr^{-1}``) ending the text."""
    token = "(?:" + "|".join(re.escape(name) for name in names) + r")(?:\s*\^\s*(?:\{\s*-?\d+\s*\}|-?\d))?"
    return re.compile(rf"(?<![A-Za-z\\])(?:{token})(?:(?:\s|\\[,;: ]|~|/|\\cdot)*(?:{token}))*\s*$")


_BARE_UNITS = _unit_pattern(_MULTI)
_BARE_OR_SINGLE = _unit_pattern(_MULTI + sorted(_SINGLE))
_BRACED = r"(?:[^{}]|\{[^{}]*\})*"  # text with at most one level of braces inside
_TEXT_UNIT = re.compile(rf"\\(?:text|mbox|mathrm|textnormal|textrm|rm)\s*\{{(?!\s*[ei]\s*\}})"  # not upright e, i
                        rf"{_BRACED}[A-Za-zÅμ]{_BRACED}\}}(?:\s*\^\s*(?:\{{\s*-?\d+\s*\}}|-?\d))?\s*$")
_DEGREE_SCALE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?\s*(?:\\(?:text|mathrm)\s*\{\s*[CFK]\s*\}|[CFK])\s*$")
_PRIMES = re.compile(r"(?:\^\s*\{?\s*(?:\\prime\s*)+\}?|'+|\")\s*$")
_SEPARATORS = re.compile(r"(?:\s|\\[,;: !]|~)+$")


def rewrite(text: str) -> str:
    """Scientific notation expanded, thousands separators joined, ``°`` written as ``^{\\circ}`` (math-verify's)."""
    return join_thousands(expand_scientific(text)).replace("°", "^{\\circ}")


def expand_scientific(text: str) -> str:
    """``6.1e5`` -> ``6.1\\times10^{5}``, ``2.5e-4`` -> ``2.5\\times10^{-4}``; Euler's e untouched."""
    return _SCIENTIFIC.sub(lambda m: f"{m[1]}\\times10^{{{m[2].lstrip('+')}}}", text)


def join_thousands(text: str) -> str:
    """``1 000`` / ``10\\,000`` -> ``1000`` / ``10000``: groups of exactly three digits after the first."""
    return _THOUSANDS.sub(lambda m: _SPACE_ONLY.sub("", m[0]), text)


def split_digits(text: str) -> bool:
    """Digits separated by spaces that are not a thousands grouping (run ``join_thousands`` first)."""
    return bool(_SPLIT_DIGITS.search(text))


def is_number(text: str) -> bool:
    """A plain or scientific number (``-1.5``, ``3\\times10^{8}``, ``10^{-3}``), nothing else."""
    return bool(_NUMERIC.fullmatch(text.strip()))


def _head_is_number(text: str, match: re.Match) -> bool:
    return is_number(_SEPARATORS.sub("", text[:match.start()]))


def _balanced(text: str) -> bool:
    """No brace left open: a tail after it is at the top level, not in a sub/superscript."""
    depth = 0
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0


def strip_units(text: str, *, single_letters: bool = False) -> str:
    """The answer without its trailing unit (see the module docstring); unchanged when none is found."""
    text = text.strip()
    for _ in range(4):  # a unit may be written in pieces: 15000 \text{ kcal m}^{-2} \text{yr}^{-1}
        stripped = _strip_one(text, single_letters)
        if stripped == text:
            return text
        text = stripped
    return text


def _strip_one(text: str, single_letters: bool) -> str:
    match = _TEXT_UNIT.search(text)
    head = _SEPARATORS.sub("", text[:match.start()]) if match else ""
    # a unit follows a value: not "=\mathrm{LRAC}", nor a name inside a subscript (v_{\text{max}})
    if head and head[-1] not in "=+-*/,(^_{" and _balanced(head):
        return head
    match = _DEGREE_SCALE.search(text)
    if match:
        return text[:match.start()] + "^{\\circ}"
    if len(text) > 120:  # a number with its unit is short; the unit patterns are slow on long text
        return text
    for pattern in (_PRIMES, _BARE_UNITS, _BARE_OR_SINGLE):
        match = pattern.search(text)
        if match and _head_is_number(text, match) and (pattern is not _BARE_OR_SINGLE or single_letters
                                                        or _compound(match[0])):
            return _SEPARATORS.sub("", text[:match.start()])
    return text


def _compound(unit: str) -> bool:
    """Single letters in a quotient or product (m/s, m s^{-1}) are units; alone (6m, 6m^2) they may be variables."""
    return "/" in unit or len(unit.split()) > 1
