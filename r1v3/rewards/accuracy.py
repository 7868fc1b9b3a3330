"""Answer checking for evaluation and the accuracy reward.

The final answer is the last ``\\boxed{…}`` (or, for multiple choice, the option letter or the
option's text), as in Skywork-R1V3 (arXiv 2507.06167, §3.2).

Two tiers:
- Rules (:func:`matches_reference`, :func:`is_correct`): normalized text, option letters, equal
  numbers and simple fractions. Pure string work, linear in the input, so the SFT stage calls
  :func:`is_correct` in-process during validation and it can never hang.
- Math-verify equivalence (:func:`math_equivalent`, huggingface/Math-Verify): ``\\frac{1}{2}`` vs
  ``0.5``, ``x+1`` vs ``1+x``, sets, intervals. Sympy can run unbounded on adversarial input, so the
  GRPO reward only calls it inside :mod:`r1v3.rewards.pool`'s killable workers.

No text from a model is ever passed to ``eval``/``exec``. Math-verify's plain-expression extractor
(``ExprExtractionConfig``) goes through ``sympy.parse_expr``, which evals a transformed string, so
only its LaTeX extractor (an ANTLR parser, latex2sympy2_extended) is used here.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Sequence

from r1v3.chat import parse_response

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WS = re.compile(r"\s+")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|\\left|\\right")
_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$")
_LETTER = re.compile(r"^\(?([a-z])\)?(?:[.:)]\s*.*)?$", re.DOTALL)
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRACTION = re.compile(r"^(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}$|^(-?\d+)/(\d+)$")
_INTEGER = re.compile(r"^-?\d{1,64}$")
_MAX_NUMBER_CHARS = 64


def normalize(text: str) -> str:
    # Only a trailing sentence period goes: a leading dot is a decimal point (".5" is not "5").
    text = _WS.sub(" ", text.strip()).rstrip(" .")
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text.strip("$").strip()
    text = _SPACING.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(3):  # \text{\textbf{x}}
        unwrapped = _WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    return text.strip().lower()


def _number(text: str) -> float | None:
    """A plain number, ``1,234.5``, ``\\frac{a}{b}`` or ``a/b``; None otherwise. Thousands commas
    only in their exact pattern, so the pair ``2,3`` never reads as 23."""
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    frac = _FRACTION.match(text)
    try:
        if frac:
            if frac.group(4) is not None:
                num, den, sign = float(frac.group(4)), float(frac.group(5)), 1.0
            else:
                num, den = float(frac.group(2)), float(frac.group(3))
                sign = -1.0 if frac.group(1) else 1.0
            return sign * num / den if den else None
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # "1e400" and "1e500" are not equal answers


def option_letter(text: str, options: Sequence[str] | None) -> str | None:
    """The option letter ``text`` names (``B``, ``(B)``, ``B.``, ``B) right``), if it is one of
    the options; None otherwise."""
    if not options:
        return None
    match = _LETTER.match(normalize(text))
    if match is None:
        return None
    letter = match.group(1).upper()
    return letter if LETTERS.index(letter) < len(options) else None


def reference_option_text(reference: str, options: Sequence[str] | None) -> str:
    """The reference as option text: the text of its letter, or the reference itself."""
    letter = option_letter(reference, options)
    return options[LETTERS.index(letter)] if letter else reference


def extract_final_answer(response: str, options: Sequence[str] | None = None) -> str | None:
    parsed = parse_response(response)
    answer = parsed.boxed
    if answer is None and options:
        # Multiple choice without \boxed: accept a trailing bare option letter.
        match = re.search(r"\b([A-Z])\b[^A-Za-z]*$", parsed.answer_text)
        answer = match.group(1) if match else None
    return answer


def matches_reference(answer: str | None, reference: str, options: Sequence[str] | None = None) -> bool:
    """Rule check on an extracted answer: letters and option texts for multiple choice, exact
    normalized text or equal numbers otherwise."""
    if answer is None:
        return False
    if options:
        got_letter, ref_letter = option_letter(answer, options), option_letter(reference, options)
        if got_letter is not None:
            if ref_letter is not None:
                return got_letter == ref_letter
            # The reference is the option's text, the answer a letter.
            return _same(options[LETTERS.index(got_letter)], reference)
        return _same(answer, reference_option_text(reference, options))
    return _same(answer, reference)


def _same(answer: str, reference: str) -> bool:
    got, ref = normalize(answer), normalize(reference)
    if got == ref:
        return True
    a, b = _number(got), _number(ref)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def is_correct(response: str, reference: str, options: Sequence[str] | None = None) -> bool:
    """Rules only (no math-verify): fast and bounded, for in-process evaluation."""
    return matches_reference(extract_final_answer(response, options), reference, options)


def verify_target(answer: str | None, reference: str, options: Sequence[str] | None = None) -> str | None:
    """What math-verify should compare ``answer`` with, or None when it has nothing to add: no
    answer, a multiple-choice letter, or two integers (the rules already decided those)."""
    if answer is None or not answer.strip():
        return None
    if options:
        if option_letter(answer, options) is not None:
            return None
        target = reference_option_text(reference, options)
    else:
        target = reference
    if _INTEGER.match(normalize(answer)) and _INTEGER.match(normalize(target)):
        return None  # two integers: the rules' verdict is exact, skip the worker round trip
    return target


def _as_boxed(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text.strip("$")
    return "\\boxed{" + text + "}"


_quiet = False


def math_equivalent(reference: str, answer: str, timeout_s: int | None = None) -> bool:
    """Math-verify equivalence of two final answers (either may be LaTeX or plain).

    ``timeout_s=None`` turns off math-verify's SIGALRM guard, which is what the killable workers of
    :mod:`r1v3.rewards.pool` want; never call it that way in a process you cannot kill.
    """
    global _quiet
    from math_verify import LatexExtractionConfig, parse, verify

    if timeout_s is None and not _quiet:
        # It warns once per process that the timeout is off; the pool is the timeout.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _quiet = True
    config = [LatexExtractionConfig()]
    gold = parse(_as_boxed(reference), extraction_config=config, parsing_timeout=timeout_s)
    if not gold:
        return False
    pred = parse(_as_boxed(answer), extraction_config=config, parsing_timeout=timeout_s)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout_s))
