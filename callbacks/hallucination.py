"""Responses that claim the model cannot see the image, and how accurate they are.

Skywork-R1V3 (arXiv 2507.06167, Table 5) finds such responses about 25 points less accurate than
the rest: the claim marks a failure to ground on the image. The callback reports the claim rate
and the accuracy split by the flag, from the validation rollouts the stage already scored.
"""

from __future__ import annotations

from typing import Sequence

from lightning.pytorch import Callback

# The detection itself is core (evaluation uses it too); re-exported for existing imports.
from r1v3.rewards.blind_claims import DEFAULT_PHRASES, blind_claim_stats, claim_pattern, has_blind_claim  # noqa: F401

METRIC_KEYS = ("blind_claim_rate", "accuracy_blind_claim", "accuracy_no_claim")


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
        records = getattr(pl_module, "val_rollouts", None)
        if not records or trainer.sanity_checking:
            return
        texts = [t for record in records for t in record.texts]
        correct = [float(s.get("accuracy", 0.0)) for record in records for s in record.scores]
        stats = blind_claim_stats(texts, correct, self.pattern)
        self.history.append({"step": trainer.global_step, **stats})
        for key, value in stats.items():
            pl_module.log(f"val/{key}", value)
