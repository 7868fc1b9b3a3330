"""Fault injection for trying out recovery: a learning-rate spike at a known step.

Skywork-R1V3 reports that a too-high RL learning rate ends in an entropy surge or collapse
(arXiv 2507.06167); ``LRSpike`` produces that failure on purpose, at a step of your choosing, so
that the alarms and ``Rollback`` can be seen working (docs/monitoring.md, "Rollback").
"""

from __future__ import annotations

from lightning.pytorch import Callback

from r1v3.callbacks.lr_alarm import scale_learning_rates
from r1v3.errors import UserError


class LRSpike(Callback):
    def __init__(self, at_step: int, factor: float = 100.0, steps: int = 2):
        """Multiply every learning rate by ``factor`` for the optimizer steps ``at_step`` to
        ``at_step + steps - 1``, then divide it back.

        Args:
            at_step: First step of the spike.
            factor: Learning-rate multiplier during the spike.
            steps: How many steps the spike lasts.
        """
        super().__init__()
        if at_step < 0 or steps < 1 or factor <= 0:
            raise UserError(f"LRSpike: need at_step >= 0, steps >= 1 and factor > 0 (got {at_step}, {steps}, {factor})")
        self.at_step, self.factor, self.steps = at_step, factor, steps
        self.phase = 0  # 0 before, 1 during, 2 after the spike (checkpointed: a resume keeps it)

    def state_dict(self) -> dict:
        return {"phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.phase = state.get("phase", 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.phase == 0 and step >= self.at_step:
            scale_learning_rates(trainer, self.factor)
            self.phase = 1
        if self.phase == 1 and step >= self.at_step + self.steps:
            scale_learning_rates(trainer, 1.0 / self.factor)
            self.phase = 2
