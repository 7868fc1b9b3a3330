"""LRInstabilityAlarm on synthetic metric streams: each signature fires, a stable stream does not."""

import random

import pytest

from r1v3.callbacks.lr_alarm import LRInstabilityAlarm, repetition_rate


def stable_stream(n=40, seed=0):
    rng = random.Random(seed)
    return [{"entropy": 1.0 + rng.uniform(-0.1, 0.1), "grad_norm": 0.8 + rng.uniform(-0.2, 0.2),
             "reward": 0.6 + rng.uniform(-0.1, 0.1)} for _ in range(n)]


def run(stream, texts=None, **kwargs):
    alarm = LRInstabilityAlarm(**kwargs)
    fired = []
    for step, metrics in enumerate(stream):
        fired += [(step, name) for name, _ in alarm.check(step, metrics, texts[step] if texts else None)]
    return fired


def test_stable_stream_never_fires():
    texts = [["<think>I count 3 red shapes.</think> The answer is \\boxed{3}."] * 4] * 40
    assert run(stable_stream(), texts) == []


@pytest.mark.parametrize("signal,key,value", [
    ("entropy_surge", "entropy", 3.0),
    ("entropy_collapse", "entropy", 0.1),
    ("grad_spike", "grad_norm", 10.0),
    ("reward_collapse", "reward", 0.1),
])
def test_each_signature_fires_at_its_step(signal, key, value):
    stream = stable_stream()
    stream[30] = dict(stream[30], **{key: value})
    assert run(stream) == [(30, signal)]


def test_no_alarm_before_enough_history():
    stream = stable_stream(6)
    stream[2] = dict(stream[2], grad_norm=100.0)
    assert run(stream) == []


def test_repetitive_rollouts_fire():
    looped = "Wait, let me recount. " * 20
    texts = [["a normal short answer with some words in it"] * 2] * 40
    texts[25] = [looped, looped]
    assert run(stable_stream(), texts) == [(25, "repetition")]
    assert repetition_rate([looped]) > 0.8
    assert repetition_rate(["one two three four five"]) == 0.0


def test_alarm_acts_inside_a_grpo_run(tiny_dirs, synth_dir):
    from lightning.pytorch import Trainer

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(tiny_dirs["internvl"]), sampling=SamplingConfig(n=2, max_new_tokens=6),
                      reward_fn="r1v3.rewards.accuracy_only", rollout_log_every=0)
    alarm = LRInstabilityAlarm(repetition=-1.0, action="stop")  # any rollout "repeats": must stop
    trainer = Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[alarm])
    with pytest.warns(UserWarning, match="LR instability at step 1: repetition"):
        trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    assert trainer.global_step == 1
    assert alarm.events[0][:2] == (1, "repetition")
