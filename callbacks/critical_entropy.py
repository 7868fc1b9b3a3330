"""Critical-token entropy: Skywork-R1V3's checkpoint-selection signal (arXiv 2507.06167, §5.1).

The paper reads the policy's entropy where reasoning branches ("Wait", "Alternatively", ...):
high values mean the model deliberates there, low values that it imitates a style. It gives no
formula; ours (docs/design.md §1, docs/monitoring.md) is the full-vocabulary entropy, in
nats, of the distribution that produced each generated token that begins a trigger word, averaged
over the rollouts. Triggers are found on decoded text, so any tokenizer works.

The callback never generates: it reads the rollouts the stage already made (``val_rollouts`` at
validation, ``last_rollouts`` during training) and runs one no-grad forward over them through the
stage's ``completion_entropy``.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from lightning.pytorch import Callback

from r1v3.rl.entropy import critical_token_stats

DEFAULT_TRIGGERS = ("Wait", "Alternatively", "Hmm", "But")
METRIC_KEYS = ("critical_entropy", "critical_entropy_norm", "trigger_rate_per_1k", "token_entropy",
               "high_entropy_share")


def trigger_pattern(words: Sequence[str], case_sensitive: bool = True) -> re.Pattern:
    """Whole-word match of any trigger: "But" matches in "<think>But," and not in "Butter"."""
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", 0 if case_sensitive else re.IGNORECASE)


def token_pieces(tokenizer, ids: Sequence[int], context: int = 4) -> list[str]:
    """The text each token adds to the decoded string.

    Decoding a token alone loses its leading space in SentencePiece vocabularies and splits
    multi-byte characters in byte-level ones, so each piece is the difference between decoding the
    token with a few tokens of left context and decoding the context alone (the incremental
    detokenization that serving engines use).
    """
    pieces = []
    for t in range(len(ids)):
        lo = max(0, t - context)
        before = tokenizer.decode(ids[lo:t], skip_special_tokens=False) if t > lo else ""
        after = tokenizer.decode(ids[lo:t + 1], skip_special_tokens=False)
        pieces.append(after[len(before):] if after.startswith(before) else after[len(before.rstrip()):])
    return pieces


def trigger_mask(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, pattern: re.Pattern) -> torch.Tensor:
    """[N, T] bool: true at each completion token whose text holds the first letter of a trigger."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    for row, (ids, m) in enumerate(zip(completion_ids.tolist(), mask.tolist())):
        ids = ids[: int(sum(m))]
        pieces = token_pieces(tokenizer, ids)
        ends, total = [], 0
        for piece in pieces:
            total += len(piece)
            ends.append(total)
        text = "".join(pieces)
        t = 0
        for match in pattern.finditer(text):
            while ends[t] <= match.start():  # the token whose span holds the match's first char
                t += 1
            out[row, t] = True
    return out


class CriticalTokenEntropy(Callback):
    def __init__(self, triggers: Sequence[str] = DEFAULT_TRIGGERS, case_sensitive: bool = True,
                 on_validation: bool = True, every_n_train_steps: int = 0, high_entropy_threshold: float = 0.57,
                 max_rollouts: int = 512):
        """Log the critical-token entropy of rollouts the stage has already generated.

        Logged as ``val/…`` at validation and ``train/…`` every N training steps:
        ``critical_entropy`` (nats) and ``critical_entropy_norm`` (/ ln|V|), absent when no
        trigger occurs; ``trigger_rate_per_1k``; ``token_entropy`` (all tokens); and
        ``high_entropy_share``. Monitor ``val/critical_entropy`` (mode max) with
        :class:`r1v3.callbacks.RankedCheckpoint` to keep the checkpoints the paper would choose.

        Args:
            triggers: Words where reasoning branches, matched as whole words on decoded text.
            case_sensitive: Match the trigger words' case exactly.
            on_validation: Measure the stage's sampled validation rollouts.
            every_n_train_steps: Also measure the training rollouts every N steps (0 = never).
            high_entropy_threshold: Normalized entropy H/ln|V| above which a token counts as
                high-entropy. 0.57 is the paper's 6.8 nats (§6.5) over ln(150K) ≈ 11.9, so tiny
                vocabularies, whose ln|V| can lie below 6.8, stay comparable.
            max_rollouts: Rollouts measured per evaluation at most (the first ones), bounding the
                extra forward pass.
        """
        super().__init__()
        self.words = list(triggers)
        self.pattern = trigger_pattern(self.words, case_sensitive)
        self.on_validation, self.every_n_train_steps = on_validation, every_n_train_steps
        self.high_entropy_threshold, self.max_rollouts = high_entropy_threshold, max_rollouts
        self.history: list[dict] = []  # (step, stats) per measurement, for reports and tests

    def measure(self, pl_module, records: Sequence) -> dict[str, float]:
        """Stats over step records (``StepRollouts``); see :func:`critical_token_stats`."""
        entropies, triggers, budget = [], [], self.max_rollouts
        vocab = None
        for record in records:
            if budget <= 0:
                break
            rollouts = record.rollouts
            entropy, vocab = pl_module.completion_entropy(record)
            n = min(budget, entropy.shape[0])
            mask = rollouts.completion_mask[:n].bool()
            entropies.append(entropy[:n][mask])  # real tokens only, so batches of any width concatenate
            found = trigger_mask(pl_module.tokenizer, rollouts.completion_ids[:n], mask, self.pattern)
            triggers.append(found[mask])
            budget -= n
        if vocab is None:
            return {}
        entropy = torch.cat(entropies)[None]
        return critical_token_stats(entropy, torch.ones_like(entropy, dtype=torch.bool), torch.cat(triggers)[None],
                                    vocab, self.high_entropy_threshold)

    def _log(self, trainer, pl_module, prefix: str, stats: dict) -> None:
        self.history.append({"step": trainer.global_step, "prefix": prefix, **stats})
        for key, value in stats.items():
            pl_module.log(f"{prefix}/{key}", value, prog_bar=key == "critical_entropy" and prefix == "val")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # Lightning keeps last evaluation's values in callback_metrics; a checkpoint must never
        # be ranked by a value measured on an earlier model.
        for key in METRIC_KEYS:
            trainer.callback_metrics.pop(f"val/{key}", None)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        records = getattr(pl_module, "val_rollouts", None)
        if self.on_validation and records and not trainer.sanity_checking:
            self._log(trainer, pl_module, "val", self.measure(pl_module, records))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        step = getattr(pl_module, "last_rollouts", None)
        if n and step is not None and trainer.global_step % n == 0:
            self._log(trainer, pl_module, "train", self.measure(pl_module, [step]))
