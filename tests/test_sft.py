"""SFT stage on a real tiny model: it learns, and every optimizer/precision option trains."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from r1v3.backbone import LoadConfig
from r1v3.data_modules.webdata import WebDataModule
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.sft import SFTStage


def fit(tiny_dirs, synth_dir, steps, logger=False, **stage_kwargs):
    precision = stage_kwargs.pop("precision", "32-true")
    stage = SFTStage(str(tiny_dirs["internvl"]), val_generate=False, **stage_kwargs)
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=8)
    trainer = Trainer(accelerator="cpu", max_steps=steps, precision=precision, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    return stage, trainer


def first_batch(stage, synth_dir, batch_size):
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=batch_size)
    data.processor = stage.processor
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_loss_is_on_assistant_tokens_only(tiny_dirs, synth_dir):
    stage = SFTStage(str(tiny_dirs["internvl"]))
    stage.configure_model()
    batch = first_batch(stage, synth_dir, 4)
    logprobs = stage.token_logprobs(batch["inputs"], batch["images"], batch["inputs"]["input_ids"])
    mask = batch["labels"] != -100
    # the loss is the mean NLL over exactly the labelled (assistant) positions ...
    assert torch.allclose(stage.supervised_loss(batch), -(logprobs[mask]).mean(), atol=1e-5)
    # ... which are a minority of the sequence: prompt and image tokens are not among them
    assert mask.sum() < batch["inputs"]["attention_mask"].sum() / 2


def test_sft_learns(tiny_dirs, synth_dir):
    stage, trainer = fit(tiny_dirs, synth_dir, 30, optimizer=OptimizerConfig(lr=2e-3, warmup_ratio=0.0))
    assert trainer.global_step == 30
    untrained = SFTStage(str(tiny_dirs["internvl"]))
    untrained.configure_model()
    batch = first_batch(stage, synth_dir, 16)
    with torch.no_grad():
        assert stage.supervised_loss(batch) < 0.6 * untrained.supervised_loss(batch)


@pytest.mark.parametrize("options", [
    {"optimizer": OptimizerConfig(name="adamw8bit", lr=1e-3)},
    {"precision": "bf16-mixed"},
    {"load": LoadConfig(gradient_checkpointing=True), "trainable": ["connector"]},
])
def test_training_options_update_the_weights(tiny_dirs, synth_dir, options):
    stage = SFTStage(str(tiny_dirs["internvl"]), val_generate=False)
    stage.configure_model()
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    trained, trainer = fit(tiny_dirs, synth_dir, 3, **options)
    changed = {n for n, p in trained.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "no parameter moved"
    if options.get("trainable") == ["connector"]:
        assert all(".multi_modal_projector." in n for n in changed)
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["train/loss"]))


def test_wandb_offline_logger(tiny_dirs, synth_dir, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="r1v3-test")
    fit(tiny_dirs, synth_dir, 2, logger=logger)
    logger.experiment.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


class FirstStepGradient(Callback):
    """The gradient the first optimizer step applied, with the ids and target counts it saw. After
    ``optimizer.step`` Lightning keeps the gradients until the next window's first backward."""

    def __init__(self):
        self.grad, self.ids, self.tokens = None, [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ids += batch["meta"]["id"]
        self.tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        if trainer.global_step == 1 and self.grad is None:
            self.grad = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])


def first_step_gradient(tiny_dirs, data_dir, batch_size, accumulate):
    stage = SFTStage(str(tiny_dirs["internvl"]), val_generate=False)
    record = FirstStepGradient()
    trainer = Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[record])
    trainer.fit(stage, datamodule=WebDataModule(train=str(data_dir), batch_size=batch_size))
    return record


def test_accumulation_gives_the_one_batch_gradient(tiny_dirs, uneven_dir):
    # The step's gradient is that of the mean over all its target tokens, however the batch is cut:
    # averaging the two halves' own means would weigh the short rows' tokens ~10x more.
    whole = first_step_gradient(tiny_dirs, uneven_dir, batch_size=4, accumulate=1)
    split = first_step_gradient(tiny_dirs, uneven_dir, batch_size=2, accumulate=2)
    assert split.ids == whole.ids
    assert max(split.tokens) > 3 * min(split.tokens), "the halves must differ in target tokens"
    # fp32, same rows: only the summation order differs (observed ~1e-7)
    assert float((split.grad - whole.grad).norm() / whole.grad.norm()) < 1e-5
