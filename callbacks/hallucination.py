"""Responses that claim the model cannot see the image, and how accurate they are.

Skywork-R1V3 (arXiv 2507.06167, Table 5) finds such responses about 25 points less accurate than
the rest: the claim marks a failure to ground on the image. The callback reports the claim rate
and the accuracy split by the flag, from the validation rollouts the stage already scored.
"""

from __future__ import annotations

import re
from typing import Sequence

from lightning.pytorch import Callback

DEFAULT_PHRASES = (
    "can't see the image", "cannot see the image", "unable to see the image", "can't view the image",
    "cannot view the image", "no image was provided", "no image provided", "image is not provided",
    "image was not provided", "don't see an image", "do not see an image", "don't see any image",
    "without seeing the image", "image is not visible", "cannot access the image", "can't access the image",
)
METRIC_KEYS = ("blind_claim_rate", "accuracy_blind_claim", "accuracy_no_claim")


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


class HallucinationMonitor(Callback):
    def __init__(self, phrases: Sequence[str] = DEFAULT_PHRASES):
        """Log ``val/blind_claim_rate``, ``val/accuracy_blind_claim`` and ``val/accuracy_no_claim``.

        Args:
            phrases: Phrases that claim the image is not visible, matched case-insensitively.
        """
        super().__init__()
        self.pattern = claim_pattern(phrases)
        self.history: list[dict] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        for key in METRIC_KEYS:  # an absent side must not show the previous evaluation's value
            trainer.callback_metrics.pop(f"val/{key}", None)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        batches = getattr(pl_module, "val_rollouts", None)
        if not batches or trainer.sanity_checking:
            return
        texts = [t for _, rollouts, _ in batches for t in rollouts.texts]
        correct = [float(s.get("accuracy", 0.0)) for _, _, scores in batches for s in scores]
        stats = blind_claim_stats(texts, correct, self.pattern)
        self.history.append({"step": trainer.global_step, **stats})
        for key, value in stats.items():
            pl_module.log(f"val/{key}", value)
