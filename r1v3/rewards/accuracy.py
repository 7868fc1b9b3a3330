"""Answer checking for evaluation and the accuracy reward.

The final answer is the last ``\\boxed{…}`` (or, for multiple choice, the option letter or the
option's text), as in Skywork-R1V3 (arXiv 2507.06167, §3.2).
"""

from __future__ import annotations

import re
from typing import Sequence

from r1v3.chat import parse_response

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    text = _WS.sub(" ", text.strip()).strip(" .")
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text)
    return text.lower()


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
    got, ref = normalize(answer), normalize(reference)
    if options:
        ref_letter = ref.upper() if len(ref) == 1 else None
        ref_text = normalize(options[LETTERS.index(ref_letter)]) if ref_letter and LETTERS.index(
            ref_letter) < len(options) else ref
        got_letter = re.fullmatch(r"\(?([a-z])\)?", got)
        if got_letter:
            return ref_letter is not None and got_letter.group(1).upper() == ref_letter
        return got == ref_text
    if got == ref:
        return True
    try:
        return abs(float(got.replace(",", "")) - float(ref.replace(",", ""))) < 1e-9
    except ValueError:
        return False


def is_correct(response: str, reference: str, options: Sequence[str] | None = None) -> bool:
    return matches_reference(extract_final_answer(response, options), reference, options)
