"""The CLI's progress bar counts optimizer steps for step-bounded runs (Lightning's reads ``Epoch 0``
with no end for ``max_epochs: -1``)."""

from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from r1v3.callbacks import StepProgressBar


def test_step_bounded_run_shows_steps_across_epochs():
    bar = StepProgressBar()
    model = BoringModel()
    # 64 batches an epoch, accumulation over 2: 40 steps need 80 batches, so the run crosses an epoch.
    trainer = Trainer(accelerator="cpu", max_steps=40, max_epochs=-1, accumulate_grad_batches=2, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, callbacks=[bar])
    trainer.fit(model)
    assert trainer.current_epoch >= 1 and trainer.global_step == 40
    assert bar.train_progress_bar.total == 40 and bar.train_progress_bar.n == 40
    assert bar.train_progress_bar.desc.startswith("Step")
