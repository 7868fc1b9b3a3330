"""Critical-token entropy: trigger detection, the statistic, and the callback on a real tiny model."""

import math

import pytest
import torch
from lightning.pytorch import Trainer

from r1v3.callbacks import CriticalTokenEntropy, RankedCheckpoint
from r1v3.callbacks.critical_entropy import DEFAULT_TRIGGERS, trigger_mask, trigger_pattern
from r1v3.data_modules.webdata import WebDataModule
from r1v3.rl.entropy import critical_token_stats
from r1v3.rl.rollout import Prompt, Rollouts, SamplingConfig
from r1v3.stages.grpo import GRPOStage
from r1v3.stages.base import OptimizerConfig


def test_critical_token_stats_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.5, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    triggers = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0]])  # the trigger at [0, 3] is padding
    stats = critical_token_stats(entropy, mask, triggers, vocab_size=100, high_threshold=0.5)
    assert stats["critical_entropy"] == pytest.approx(3.0)  # (2 + 4) / 2
    assert stats["critical_entropy_norm"] == pytest.approx(3.0 / math.log(100))
    assert stats["trigger_rate_per_1k"] == pytest.approx(1000 * 2 / 5)
    assert stats["token_entropy"] == pytest.approx((1 + 2 + 3 + 0.5 + 4) / 5)
    assert stats["high_entropy_share"] == pytest.approx(2 / 5)  # 3 and 4 nats exceed 0.5·ln 100 ≈ 2.30


def test_no_trigger_means_no_value_rather_than_nan():
    stats = critical_token_stats(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 50, 0.5)
    assert "critical_entropy" not in stats and "critical_entropy_norm" not in stats
    assert stats["trigger_rate_per_1k"] == 0.0


def test_triggers_are_whole_words_on_decoded_text(internvl_processor):
    tok = internvl_processor.tokenizer
    text = "<think>Wait, let me recount. But the Butter is 3. Hmm ok Alternatively</think> \\boxed{3}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    found = trigger_mask(tok, torch.tensor([ids]), torch.ones(1, len(ids)), trigger_pattern(DEFAULT_TRIGGERS))
    starts = [tok.decode(ids[t:], skip_special_tokens=False).lstrip()[:13] for t in found[0].nonzero().flatten()]
    assert [s.split(",")[0].split(" ")[0].split("<")[0] for s in starts] == ["Wait", "But", "Hmm", "Alternatively"]


def make_stage(tiny_dirs):
    return GRPOStage(str(tiny_dirs["internvl"]), sampling=SamplingConfig(n=2, max_new_tokens=12),
                     reward_fn="test_grpo.length_reward", rollout_log_every=0, val_samples=2,
                     optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"))


def val_prompts(stage, synth_dir, n=2):
    data = WebDataModule(train=str(synth_dir / "train"), val=str(synth_dir / "val"), val_batch_size=n)
    data.processor, data.collate_mode = stage.processor, "prompt"
    data.setup("validate")
    meta = next(iter(data.val_dataloader()))["meta"]
    return [Prompt(t, i) for t, i in zip(meta["prompt_text"], meta["pil_images"])]


def test_matches_a_manual_computation_from_the_logits(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs)
    stage.setup("fit")
    stage.configure_model()
    stage.model.eval()
    tok = stage.tokenizer
    prompts = val_prompts(stage, synth_dir)
    texts = ["<think>Wait, 3 dots. But check. Hmm yes.</think> \\boxed{3}", "<think>Alternatively count twice.</think> 4"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    rollouts = Rollouts(ids, mask, torch.zeros(ids.shape), texts, ["stop", "stop"], group_size=1)

    stats = CriticalTokenEntropy().measure(stage, [stage.record(prompts, rollouts)])

    # By hand: one forward per prompt + completion; token t's distribution is the logits at t-1.
    manual = []
    for prompt, row in zip(prompts, rows):
        enc = stage.processor(text=[prompt.text], images=prompt.images, return_tensors="pt")
        full = torch.cat([enc["input_ids"], torch.tensor([row])], dim=1)
        with torch.no_grad():
            logits = stage.model(input_ids=full, attention_mask=torch.ones_like(full),
                                 pixel_values=enc["pixel_values"]).logits[0]
        text = tok.decode(row, skip_special_tokens=False)
        for t in range(len(row)):
            before = len(tok.decode(row[:t], skip_special_tokens=False))
            new = tok.decode(row[: t + 1], skip_special_tokens=False)[before:]
            rest = text[before:].lstrip()  # token t begins a trigger when the word starts in it
            if new.strip() and any(rest.startswith(w) and not rest[len(w)].isalnum() for w in DEFAULT_TRIGGERS):
                # the distribution rollouts sample: the image placeholders are banned
                step_logits = logits[enc["input_ids"].shape[1] + t - 1].float()
                step_logits[stage.placeholder_ids] = float("-inf")
                dist = torch.distributions.Categorical(logits=step_logits)
                manual.append(float(dist.entropy()))
    assert len(manual) == 4
    assert stats["critical_entropy"] == pytest.approx(sum(manual) / 4, rel=1e-4)
    assert stats["critical_entropy_norm"] == pytest.approx(sum(manual) / 4 / math.log(len(tok)), rel=1e-4)
    assert stats["trigger_rate_per_1k"] == pytest.approx(1000 * 4 / int(mask.sum()))


@pytest.mark.parametrize("triggers", [("Zzyzx",), ("the", "So", "is", "see", "top", "circle", "answer", "higher", "Which", "points", "purple")])
def test_monitored_checkpointing_with_and_without_triggers(tiny_dirs, synth_dir, tmp_path, triggers):
    stage = make_stage(tiny_dirs)
    monitor = CriticalTokenEntropy(triggers=triggers)
    ckpt = RankedCheckpoint(dirpath=tmp_path, monitor="val/critical_entropy", mode="max", save_top_k=2, save_last=True)
    data = WebDataModule(train=str(synth_dir / "train"), val=str(synth_dir / "val"), batch_size=2, val_batch_size=8)
    trainer = Trainer(accelerator="cpu", max_steps=2, val_check_interval=1, limit_val_batches=1, logger=False,
                      callbacks=[monitor, ckpt], enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, check_val_every_n_epoch=None)
    trainer.fit(stage, datamodule=data)
    assert (tmp_path / "last.ckpt").exists()
    measured = [h for h in monitor.history if h["prefix"] == "val"]
    assert len(measured) == 2 and all("token_entropy" in h for h in measured)
    ranked = sorted(tmp_path.glob("*.ckpt.json"))
    if triggers == ("Zzyzx",):
        assert all("critical_entropy" not in h for h in measured)
        assert "val/critical_entropy" not in trainer.callback_metrics and not ranked
    else:
        assert all(h["critical_entropy"] > 0 for h in measured)
        assert len(ranked) == 2
        import json

        sides = [json.loads(p.read_text()) for p in ranked]
        assert {s["metrics"]["val/critical_entropy"] for s in sides} == {h["critical_entropy"] for h in measured}
        assert all((tmp_path / s["checkpoint"]).exists() for s in sides)
