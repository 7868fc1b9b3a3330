"""ModelCheckpoint for metrics that are sometimes absent, with a sidecar of metrics per checkpoint,
and the last healthy checkpoints a rollback returns to.

Critical-token entropy is undefined for an evaluation whose rollouts hold no trigger word, and
Lightning's ModelCheckpoint raises when the monitored key is missing after validation has run.
RankedCheckpoint skips the top-k decision for that evaluation instead (``last.ckpt`` is still
written), and writes ``X.ckpt.json`` beside each top-k checkpoint with the validation metrics it
was chosen on, which ``r1v3 report`` ranks.

With ``keep_healthy: M`` it also saves ``healthy-step=N.ckpt`` every ``healthy_every_n_steps``
steps when no alarm fell in the ``healthy_window`` steps before (the stage's alarm log,
r1v3.stages.health), and keeps the last M of them. A top-k checkpoint judged healthy when it was
saved joins the healthy list too. The two policies share the directory and each file: a file is
deleted only when neither the top-k ranking (with ``last.ckpt``) nor the healthy list holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from r1v3.errors import UserError


def sidecar_path(checkpoint: str | Path) -> Path:
    return Path(f"{checkpoint}.json")


class RankedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that tolerates an absent monitored metric and can keep healthy checkpoints."""

    def __init__(self, *args, keep_healthy: int = 0, healthy_every_n_steps: int = 0, healthy_window: int = 5,
                 **kwargs):
        """Lightning's ``ModelCheckpoint`` arguments, and:

        Args:
            keep_healthy: Keep the last M checkpoints judged healthy when saved (0 = none); the
                ones ``r1v3.callbacks.Rollback`` returns to.
            healthy_every_n_steps: Save a healthy checkpoint every N optimizer steps (0 = only the
                top-k checkpoints can be healthy ones).
            healthy_window: A checkpoint is healthy when no alarm fell in this many steps up to its save.
        """
        super().__init__(*args, **kwargs)
        if keep_healthy < 0 or healthy_every_n_steps < 0 or healthy_window < 1:
            raise UserError("RankedCheckpoint: keep_healthy and healthy_every_n_steps must be >= 0 and "
                            f"healthy_window >= 1 (got {keep_healthy}, {healthy_every_n_steps}, {healthy_window})")
        self.keep_healthy, self.healthy_every_n_steps = keep_healthy, healthy_every_n_steps
        self.healthy_window = healthy_window
        self.healthy: list[dict] = []  # {"step", "path"}, oldest first

    # -- healthy checkpoints ---------------------------------------------------------------------
    def judge(self, trainer, pl_module) -> bool:
        """No alarm in the last ``healthy_window`` steps, on any rank."""
        since = trainer.global_step - self.healthy_window + 1
        alarms = getattr(pl_module, "alarms_since", lambda step: [])(since)
        return bool(trainer.strategy.reduce_boolean_decision(not alarms, all=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.healthy_every_n_steps
        due = (self.keep_healthy and every and step > 0 and step % every == 0
               and not self.holds_healthy_step(step) and not trainer.sanity_checking)
        if due and self.judge(trainer, pl_module):
            path = str(Path(self.dirpath) / f"healthy-step={step}{self.FILE_EXTENSION}")
            trainer.save_checkpoint(path, self.save_weights_only)
            self.add_healthy(trainer, step, path)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def holds_healthy_step(self, step: int) -> bool:
        return any(entry["step"] == step for entry in self.healthy)

    def holds_healthy_path(self, path: str) -> bool:
        return any(entry["path"] == path for entry in self.healthy)

    def add_healthy(self, trainer, step: int, path: str) -> None:
        self.healthy.append({"step": step, "path": path})
        while len(self.healthy) > self.keep_healthy:
            self.release(trainer, self.healthy.pop(0)["path"])

    def last_healthy(self, at_most: int) -> dict | None:
        """The newest healthy checkpoint saved at step ``at_most`` or before."""
        return next((e for e in reversed(self.healthy) if e["step"] <= at_most), None)

    def drop_healthy(self, trainer, after: int) -> None:
        """Forget (and delete, unless ranked) the healthy checkpoints saved after step ``after``."""
        for entry in [e for e in self.healthy if e["step"] > after]:
            self.healthy.remove(entry)
            self.release(trainer, entry["path"])

    def ranked_holds(self, path: str) -> bool:
        return path in self.best_k_models or path in (self.last_model_path, self.best_model_path)

    def release(self, trainer, path: str) -> None:
        """The healthy list no longer needs ``path``; delete it unless the ranking does."""
        if not self.ranked_holds(path) and not self.holds_healthy_path(path):
            self._remove_checkpoint(trainer, path)

    def state_dict(self) -> dict:
        return super().state_dict() | {"healthy": list(self.healthy)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.healthy = list(state_dict.get("healthy", []))

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
        if (self.keep_healthy and saved in self.best_k_models and not self.holds_healthy_step(trainer.global_step)
                and self.judge(trainer, trainer.lightning_module)):
            self.add_healthy(trainer, trainer.global_step, saved)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if self.holds_healthy_path(filepath):  # top-k let it go; the healthy list has not
            return
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            sidecar_path(filepath).unlink(missing_ok=True)
