"""A stage's health: the non-finite guard, and the alarm log the monitors write to and the
checkpoint and rollback callbacks read (docs/monitoring.md, "Rollback").

Every alarm (the LR-instability signals, the KL monitor's, N non-finite updates in a row) is
published here as ``(step, name, why)``. ``RankedCheckpoint`` judges a checkpoint healthy when no
alarm fell in the steps before it was saved, and ``Rollback`` acts on the alarms it is configured
for. The log is checkpointed, so a resumed run judges its checkpoints as the uninterrupted one did.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from r1v3.stages.in_backward import OptimizerInBackward


def publish(pl_module, name: str, why: str) -> None:
    """Record an alarm in the stage's log (a module without one, e.g. a user's, ignores it)."""
    if hasattr(pl_module, "publish_alarm"):
        pl_module.publish_alarm(name, why)


class DivergedError(ValueError):
    """Training diverged and nothing configured can recover it; the message says what to do."""


class NonFiniteError(DivergedError):
    """Too many consecutive updates had a NaN/inf loss or gradient."""


class StageHealth:
    """Mixed into :class:`r1v3.stages.base.R1V3Module`."""

    max_nonfinite_in_a_row = 5  # then the run has diverged, not hit a bad batch
    # Alarm names a callback (Rollback) recovers from; for these the stage publishes instead of raising.
    recoverable: frozenset[str] = frozenset()

    # -- alarm log -------------------------------------------------------------------------------
    @property
    def alarms(self) -> list[dict]:
        """Every alarm of the run so far: ``{"step", "name", "why"}``, oldest first."""
        if not hasattr(self, "_alarms"):
            self._alarms = []
        return self._alarms

    def publish_alarm(self, name: str, why: str) -> None:
        self.alarms.append({"step": int(self.global_step), "name": name, "why": why})

    def alarms_since(self, step: int) -> list[dict]:
        """The alarms raised at ``step`` or later."""
        return [a for a in self.alarms if a["step"] >= step]

    def save_health(self, checkpoint: dict) -> None:
        checkpoint["r1v3_alarms"] = list(self.alarms)

    def load_health(self, checkpoint: dict) -> None:
        self._alarms = list(checkpoint.get("r1v3_alarms", []))

    def after_rollback(self, checkpoint: dict, reseed: bool) -> None:
        """Called once the weights and optimizer state of ``checkpoint`` are back (subclasses
        restore what else of theirs the collapse may have spoilt)."""
        self._nonfinite_run = 0

    # -- non-finite guard ------------------------------------------------------------------------
    def skip_nonfinite(self, what: str) -> None:
        """Count an update skipped for a non-finite loss or gradient. Too many in a row raise, or
        raise the ``nonfinite`` alarm when a rollback is configured for it."""
        self._nonfinite_total = getattr(self, "_nonfinite_total", 0) + 1
        self._nonfinite_run = getattr(self, "_nonfinite_run", 0) + 1
        rank_zero_warn(f"[r1v3] step {self.global_step}: non-finite {what}, update skipped "
                       f"({self._nonfinite_run} in a row, {self._nonfinite_total} in all)")
        self.log("alarm/nonfinite", 1.0)
        self.log("train/nonfinite_skipped", float(self._nonfinite_total))
        if self._nonfinite_run >= self.max_nonfinite_in_a_row:
            why = f"{self._nonfinite_run} updates in a row had a non-finite {what} (step {self.global_step})"
            if "nonfinite" in self.recoverable:
                self.publish_alarm("nonfinite", why)
                self._nonfinite_run = 0
                return
            raise NonFiniteError(f"{why}; the run has diverged: lower the learning rate or resume from an "
                                 "earlier checkpoint")

    def finite_update(self) -> None:
        self._nonfinite_run = 0
        if getattr(self, "_nonfinite_total", 0):  # 0 between alarms: a step metric's last value repeats
            self.log("alarm/nonfinite", 0.0)

    def gradients_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def on_before_optimizer_step(self, optimizer) -> None:
        if isinstance(optimizer, OptimizerInBackward):  # the backward has already stepped
            if optimizer.nonfinite:
                optimizer.nonfinite = 0
                self.skip_nonfinite("gradient (those parameters kept their weights)")
            else:
                self.finite_update()
            return
        # Automatic optimization (SFT): with every gradient set to None, torch optimizers leave the
        # parameters and their moment estimates untouched, which is a skipped update.
        if self.automatic_optimization and any(p.grad is not None for p in self.model.parameters()):
            # (no gradient at all: training_step skipped this batch and has counted it already)
            if self.gradients_finite():
                self.finite_update()
            else:
                optimizer.zero_grad(set_to_none=True)
                self.skip_nonfinite("gradient")
