"""Non-finite losses and gradients: the update is skipped and counted; too many in a row stop the run.

The fault is injected where it arises in practice, in the model's output: a forward hook on the LM
head turns the logits to NaN during the chosen training forwards (generation runs without grad and
is left alone, so GRPO can still sample).
"""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from r1v3.data_modules.webdata import WebDataModule
from r1v3.stages.base import NonFiniteError
from r1v3.stages.sft import SFTStage
from test_grpo import make_stage


class PoisonSteps(Callback):
    """NaN logits in the training forwards of the given batches; records weights around each step."""

    def __init__(self, batches):
        self.batches, self.active, self.changed = set(batches), False, {}

    def setup(self, trainer, pl_module, stage):
        pl_module.configure_model()
        head = pl_module.model.get_output_embeddings()
        head.register_forward_hook(lambda m, i, out: out * float("nan") if self.active and torch.is_grad_enabled() else out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = batch_idx in self.batches
        self.before = [p.detach().clone() for p in pl_module.model.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = [p.detach() for p in pl_module.model.parameters() if p.requires_grad]
        self.changed[batch_idx] = any(not torch.equal(a, b) for a, b in zip(after, self.before))
        assert all(torch.isfinite(p).all() for p in after), "a non-finite update reached the weights"


def fit(stage, synth_dir, poison, steps):
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=2)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      log_every_n_steps=1, callbacks=[poison])
    trainer.fit(stage, datamodule=data)
    return trainer


@pytest.mark.parametrize("stage_name", ["sft", "grpo"])
def test_a_nonfinite_step_is_skipped_and_training_goes_on(tiny_dirs, synth_dir, stage_name):
    stage = (SFTStage(str(tiny_dirs["internvl"]), val_generate=False) if stage_name == "sft"
             else make_stage(tiny_dirs))
    poison = PoisonSteps({1})
    trainer = fit(stage, synth_dir, poison, steps=3)
    assert stage._nonfinite_total == 1
    assert poison.changed[0] and not poison.changed[1] and poison.changed[2], poison.changed
    assert trainer.global_step == 3
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_error(tiny_dirs, synth_dir):
    stage = SFTStage(str(tiny_dirs["internvl"]), val_generate=False)
    stage.max_nonfinite_in_a_row = 3
    with pytest.raises(NonFiniteError, match="3 updates in a row had a non-finite loss"):
        fit(stage, synth_dir, PoisonSteps(range(1, 100)), steps=10)
