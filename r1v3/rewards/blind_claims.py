"""Responses that claim the model cannot see the image.

Skywork-R1V3 (arXiv 2507.06167, Table 5) finds such responses about 25 points less accurate than
the rest: the claim marks a failure to ground on the image. The evaluation stage and the
``HallucinationMonitor`` callback both report the claim rate and the accuracy split by it.
"""

from __future__ import annotations

import re
from typing import Sequence

DEFAULT_PHRASES = (
    "can't see the image", "cannot see the image", "unable to see the image", "can't view the image",
    "cannot view the image", "no image was provided", "no image provided", "image is not provided",
    "image was not provided", "don't see an image", "do not see an image", "don't see any image",
    "without seeing the image", "image is not visible", "cannot access the image", "can't access the image",
)


def claim_pattern(phrases: Sequence[str]) -> re.Pattern:
    """Case-insensitive match of any phrase; curly apostrophes count as straight ones."""
    return re.compile("|".join(re.escape(p.lower()) for p in phrases))


def has_blind_claim(text: str, pattern: re.Pattern) -> bool:
    """Whether one response claims it cannot see the image (``pattern`` from :func:`claim_pattern`)."""
    return bool(pattern.search(text.lower().replace("\u2019", "'")))


def blind_claim_stats(texts: Sequence[str], correct: Sequence[float], pattern: re.Pattern) -> dict[str, float]:
    """Claim rate and accuracy with/without the claim; a side with no response has no key."""
    if not texts:
        return {}
    flags = [has_blind_claim(t, pattern) for t in texts]
    claimed = [float(c) for c, f in zip(correct, flags) if f]
    other = [float(c) for c, f in zip(correct, flags) if not f]
    out = {"blind_claim_rate": len(claimed) / len(texts)}
    if claimed:
        out["accuracy_blind_claim"] = sum(claimed) / len(claimed)
    if other:
        out["accuracy_no_claim"] = sum(other) / len(other)
    return out
