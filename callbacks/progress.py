"""A progress bar for runs bounded by ``trainer.max_steps``.

Lightning's bar counts batches per epoch; a step-bounded run (``max_epochs: -1``, the r1v3 configs)
then reads ``Epoch 0`` with no end in sight, and a GRPO batch or an accumulation window is not one
step. This bar shows ``Step k/max_steps`` in optimizer steps, across epochs; the CLI installs it
unless a config names a progress bar of its own.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    @staticmethod
    def _by_steps(trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if trainer.current_epoch == 0 or bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
            bar.set_description("Step")
            bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module))
