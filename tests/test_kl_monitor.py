"""KLMonitor and HallucinationMonitor on real GRPO runs of a tiny model."""

import copy
import math

import pytest
import torch
from lightning.pytorch import Trainer

from r1v3.callbacks import HallucinationMonitor, KLMonitor
from r1v3.callbacks.hallucination import DEFAULT_PHRASES, blind_claim_stats, claim_pattern
from r1v3.data_modules.webdata import WebDataModule
from r1v3.rl.rollout import HFGenerateEngine, SamplingConfig
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.grpo import GRPOStage


def word_accuracy(items):
    """Correct when the response says "the": varies across this random model's responses."""
    return [{"reward": float(" the" in it["response"]), "accuracy": float(" the" in it["response"])} for it in items]


def make_stage(tiny_dirs, **kwargs):
    kwargs.setdefault("sampling", SamplingConfig(n=4, max_new_tokens=10))
    kwargs.setdefault("reward_fn", "test_grpo.length_reward")
    return GRPOStage(str(tiny_dirs["internvl"]), rollout_log_every=0,
                     optimizer=OptimizerConfig(lr=2e-2, warmup_ratio=0.0, schedule="constant"), **kwargs)


def fit(stage, synth_dir, callbacks, steps, **trainer_kwargs):
    data = WebDataModule(train=str(synth_dir / "train"), val=str(synth_dir / "val"), batch_size=2, val_batch_size=8)
    trainer_kwargs.setdefault("limit_val_batches", 0)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks, **trainer_kwargs)
    trainer.fit(stage, datamodule=data)
    return trainer


def test_estimates_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -5.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    est = KLMonitor.estimates(logp, ref, torch.tensor([[1, 1, 0]]))
    lr = [-0.5, 1.0]  # log π_ref − log π on the two real tokens
    assert est["k1"] == pytest.approx(sum(-x for x in lr) / 2)
    assert est["k2"] == pytest.approx(sum(x * x / 2 for x in lr) / 2)
    assert est["k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in lr) / 2)


def test_kl_to_the_reference_is_measured_at_beta_zero_and_alarms(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs)  # kl_coef = 0: the loss loads no reference
    monitor = KLMonitor(max_kl=1e-3, action="stop", max_logprob_gap=None)
    trainer = fit(stage, synth_dir, [monitor], steps=5)
    history = monitor.history
    assert stage.reference is not None and stage.hparams.kl_coef == 0
    assert not any(p.requires_grad for p in stage.reference[0].parameters())
    # Step 1 samples from the initial policy, which is the reference: the KL is zero.
    assert abs(history[0]["k1"]) < 1e-4 and history[0]["k3"] < 1e-6
    # After an update at lr 2e-2 the policy has moved: k2 and k3 are positive and the alarm stops it.
    assert history[1]["k3"] > 1e-3 and history[1]["k2"] > 0
    assert trainer.global_step == 2, "action=stop ends the run at the first alarm"
    for key in ("kl/k1", "kl/k2", "kl/k3"):
        assert key in trainer.callback_metrics
    assert float(trainer.callback_metrics["alarm/kl"]) == 1.0


def test_a_stale_engine_trips_the_logprob_gap_alarm(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs)
    stage.setup("fit")
    stage.configure_model()

    class StaleEngine(HFGenerateEngine):
        def sync_weights(self, model, groups=None, force=False):  # the bug under watch: a push that never lands
            return {}

    # It samples from a frozen copy of the initial weights.
    stage.engine = StaleEngine(copy.deepcopy(stage.model), stage.encoder, stage.tokenizer,
                               suppress_tokens=stage.engine.suppress_tokens)
    monitor = KLMonitor(max_logprob_gap=0.01)
    trainer = fit(stage, synth_dir, [monitor], steps=3)
    names = [(step, name) for step, name, _ in monitor.events]
    assert (1, "logprob_gap") not in names, "the first step still agrees"
    assert any(name == "logprob_gap" for step, name in names if step >= 2)
    assert float(trainer.callback_metrics["train/logprob_gap"]) > 0.01


def test_policy_drift_between_updates_is_logged(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs, num_iterations=2)
    monitor = KLMonitor(max_policy_drift=1e-12)
    trainer = fit(stage, synth_dir, [monitor], steps=4)  # 2 rollout batches × 2 updates
    assert float(trainer.callback_metrics["kl/policy_drift"]) > 0
    # The drift stays above the threshold: one alarm when it crosses, none while it stays above,
    # and the logged alarm series goes back to 0.
    assert [name for _, name, _ in monitor.events] == ["policy_drift"]
    assert float(trainer.callback_metrics["alarm/policy_drift"]) == 0.0


def test_blind_claim_stats_by_hand():
    texts = ["I can't see the image, so 3.", "It is 4.", "Sorry, I CANNOT SEE THE IMAGE.", "5", "No image provided"]
    correct = [1, 1, 0, 0, 0]
    stats = blind_claim_stats(texts, correct, claim_pattern(DEFAULT_PHRASES))
    assert stats == pytest.approx({"blind_claim_rate": 3 / 5, "accuracy_blind_claim": 1 / 3, "accuracy_no_claim": 1 / 2})
    assert blind_claim_stats(["4", "5"], [1, 0], claim_pattern(DEFAULT_PHRASES)) == {
        "blind_claim_rate": 0.0, "accuracy_no_claim": 0.5}
    assert blind_claim_stats(["I can\u2019t see the image"], [0], claim_pattern(DEFAULT_PHRASES))["blind_claim_rate"] == 1


def test_hallucination_split_matches_validation_accuracy(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs, val_samples=2, reward_fn="test_kl_monitor.word_accuracy")
    monitor = HallucinationMonitor(phrases=["Row", "answer", "point"])  # a word this random model does write
    data = WebDataModule(train=str(synth_dir / "train"), val=str(synth_dir / "val"), val_batch_size=8)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                      callbacks=[monitor])
    trainer.validate(stage, datamodule=data)
    m = trainer.callback_metrics
    rate = float(m["val/blind_claim_rate"])
    assert 0 < rate < 1, "the phrase occurs in some validation responses"
    claimed, other = float(m["val/accuracy_blind_claim"]), float(m["val/accuracy_no_claim"])
    assert rate * claimed + (1 - rate) * other == pytest.approx(float(m["val/accuracy"]), abs=1e-6)
