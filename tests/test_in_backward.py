"""Optimizer in backward: the same trajectory as a normal optimizer step, gradients freed during the
backward, checkpoints that round-trip, and clear errors where it cannot apply."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from r1v3.backbone import BackboneError
from r1v3.data_modules.webdata import WebDataModule
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.in_backward import OptimizerInBackward
from r1v3.stages.sft import SFTStage


class GradientsAfterBackward(Callback):
    def __init__(self):
        self.held = []

    def on_after_backward(self, trainer, stage):
        self.held.append(sum(p.grad is not None for p in stage.model.parameters()))


def fit(tiny_dirs, synth_dir, steps, in_backward, callbacks=(), **trainer_kwargs):
    torch.manual_seed(0)
    # Warm-up makes the learning rate change every step: the scheduler must reach the inner optimizers.
    stage = SFTStage(str(tiny_dirs["internvl"]), val_generate=False, trainable=("vision", "connector", "llm"),
                     optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.5, schedule="cosine", weight_decay=0.01,
                                               in_backward=in_backward))
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=4))
    return stage, trainer


def test_same_trajectory_as_a_normal_step_and_no_gradients_kept(tiny_dirs, synth_dir):
    held = GradientsAfterBackward()
    fused, trainer = fit(tiny_dirs, synth_dir, 4, in_backward=True, callbacks=[held])
    plain, _ = fit(tiny_dirs, synth_dir, 4, in_backward=False)
    assert isinstance(trainer.optimizers[0], OptimizerInBackward)
    assert held.held == [0, 0, 0, 0], "every gradient is freed inside the backward"
    moved = 0
    for (name, a), (_, b) in zip(fused.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
        moved += 1
    assert moved > 0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])


def test_state_round_trips(tiny_dirs, synth_dir):
    stage, trainer = fit(tiny_dirs, synth_dir, 2, in_backward=True)
    opt = trainer.optimizers[0]
    state = opt.state_dict()
    params = [p for p in stage.model.parameters() if p.requires_grad]
    fresh = OptimizerInBackward(params, lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    fresh.load_state_dict(state)
    for a, b in zip(opt.inner, fresh.inner):
        for p in a.state:
            q = b.param_groups[0]["params"][0]
            torch.testing.assert_close(a.state[p]["exp_avg"], b.state[q]["exp_avg"])
    fresh.remove_hooks()


@pytest.mark.parametrize("trainer_kwargs, words", [
    ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
])
def test_incompatible_settings_are_refused(tiny_dirs, synth_dir, trainer_kwargs, words):
    with pytest.raises(BackboneError, match=words):
        fit(tiny_dirs, synth_dir, 1, in_backward=True, **trainer_kwargs)


def test_grpo_refuses_it(tiny_dirs, synth_dir):
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(tiny_dirs["internvl"]), sampling=SamplingConfig(n=2, max_new_tokens=4),
                      optimizer=OptimizerConfig(in_backward=True), reward_fn="test_grpo.length_reward")
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(BackboneError, match="accumulates micro-batches"):
        trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
