"""ModelCheckpoint for metrics that are sometimes absent, with a sidecar of metrics per checkpoint.

Critical-token entropy is undefined for an evaluation whose rollouts hold no trigger word, and
Lightning's ModelCheckpoint raises when the monitored key is missing after validation has run.
RankedCheckpoint skips the top-k decision for that evaluation instead (``last.ckpt`` is still
written), and writes ``X.ckpt.json`` beside each top-k checkpoint with the validation metrics it
was chosen on, which ``r1v3 report`` ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


def sidecar_path(checkpoint: str | Path) -> Path:
    return Path(f"{checkpoint}.json")


class RankedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that tolerates an absent monitored metric."""

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if self.monitor is not None and self.save_top_k != 0 and self.monitor not in monitor_candidates:
            rank_zero_info(f"[r1v3] step {trainer.global_step}: no {self.monitor} in this evaluation; "
                           "checkpoint ranking skips it")
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        saved = self._last_checkpoint_saved
        if trainer.is_global_zero and saved in self.best_k_models:
            metrics = {k: float(v) for k, v in monitor_candidates.items()
                       if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
            record = {"checkpoint": Path(saved).name, "step": trainer.global_step,
                      "epoch": trainer.current_epoch, "monitor": self.monitor, "metrics": metrics}
            sidecar_path(saved).write_text(json.dumps(record, indent=1))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            sidecar_path(filepath).unlink(missing_ok=True)
