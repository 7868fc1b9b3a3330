"""The rollout engine's lifecycle as the GRPO stage drives it, and what a step costs the processor.

The recording engine is the real HF engine with its calls logged: the test is about the order in
which the stage calls the engine contract (the session: wake → sync → generate → sleep), not
about vLLM, whose sleep mode needs a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer

from r1v3.data_modules.webdata import WebDataModule
from r1v3.rl.rollout import HFGenerateEngine, SamplingConfig
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.grpo import GRPOStage


def varied_reward(items):
    return [{"reward": min(len(it["response"]) / 50.0, 1.0), "accuracy": 0.0, "format": 0.0} for it in items]


class RecordingEngine(HFGenerateEngine):
    """Logs every contract call and every call made while asleep."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []
        self.asleep = True  # an engine with sleep mode starts out of the way until woken
        self.while_asleep: list[str] = []

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if self.asleep and name in ("sync", "generate"):
            self.while_asleep.append(name)

    def wake(self) -> None:
        self._record("wake")
        self.asleep = False

    def sleep(self) -> None:
        self._record("sleep")
        self.asleep = True

    def sync_weights(self, model, groups=None, force=False) -> dict:
        self._record("sync")
        return super().sync_weights(model, groups, force)

    def generate(self, *args, **kwargs):
        self._record("generate")
        return super().generate(*args, **kwargs)


def make_stage(tiny_dirs, **kwargs):
    stage = GRPOStage(str(tiny_dirs["internvl"]), sampling=SamplingConfig(n=2, max_new_tokens=6),
                      reward_fn="test_engines.varied_reward", rollout_log_every=0, val_samples=2,
                      optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"), **kwargs)
    stage.setup("fit")
    stage.configure_model()
    return stage


def test_every_generate_and_sync_happens_on_an_awake_engine(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs)
    engine = stage.engine = RecordingEngine(stage.model, stage.encoder, stage.tokenizer,
                                            suppress_tokens=stage.engine.suppress_tokens)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                      val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), val=str(synth_dir / "val"),
                                                batch_size=2))
    assert trainer.global_step == 2
    step = ["wake", "sync", "generate", "sleep"]
    validation = ["wake", "sync", "generate", "generate", "sleep"]  # greedy, then sampled
    # Two training steps, the validation after step 2, and fit's end (its update is pushed too:
    # nothing is stale any more, so no sync).
    assert engine.calls == step + step + validation + ["wake", "sleep"], engine.calls
    assert engine.while_asleep == []


def test_each_image_is_processed_once_per_step(tiny_dirs, synth_dir):
    from r1v3.callbacks import CriticalTokenEntropy, KLMonitor, LRInstabilityAlarm

    stage = make_stage(tiny_dirs, kl_coef=0.05, mini_batches=2, micro_batch_tokens=64)
    image_processor = stage.processor.image_processor
    seen: list[int] = []
    original = image_processor.preprocess

    def counting(images, *args, **kwargs):
        flat = images if isinstance(images, list) else [images]
        while flat and isinstance(flat[0], list):
            flat = [img for group in flat for img in group]
        seen.extend(id(img) for img in flat)
        return original(images, *args, **kwargs)

    image_processor.preprocess = counting
    step_images: list[int] = []

    class StepImages(KLMonitor):  # the step's own images, read from its record
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            step_images.extend(id(img) for p in pl_module.last_rollouts.prompts for img in p.images)

    monitors = [StepImages(), CriticalTokenEntropy(every_n_train_steps=1), LRInstabilityAlarm()]
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=monitors)
    # One rollout batch, two updates (mini_batches=2): old log-probs, KL reference, both monitors
    # and a token budget that cuts several micro-batches all read the step's prompts.
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2, num_workers=0))
    assert trainer.global_step == 2 and len(step_images) == 2
    assert all(seen.count(i) == 1 for i in step_images), "an image of the step went through the processor twice"
    assert len(seen) == len(set(seen)), "no image is processed twice (the loader's prefetched batch included)"
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["kl/k3"])))


def test_the_agreement_check_runs_at_start_and_after_the_first_real_push():
    from r1v3.rl.engines import EngineSession

    class Scheduled:  # an engine that pushes on every second sync (sync_every=2)
        def __init__(self):
            self.syncs = 0

        def sync_weights(self, model, groups=None, force=False):
            self.syncs += 1
            return {"tensors": 1} if force or self.syncs % 2 == 1 else {}

        def wake(self):
            pass

        def sleep(self):
            pass

    session = EngineSession(Scheduled(), lambda: (torch.nn.Linear(1, 1), None))
    due = []
    for entry in range(6):  # an update before every entry but the first
        if entry:
            session.mark_stale()
        with session:
            due.append(session.agreement_due())
    # entry 0: start + full push; entry 1: the schedule skips the push (the engine stays one step
    # behind on purpose, so no check); entry 2: the first update's push; then never again
    assert due == [True, False, True, False, False, False]
