"""GRPO stage on real tiny models: rollouts, log-prob agreement, gradients and freeze plans."""

import pytest
import torch
from lightning.pytorch import Trainer

from r1v3.data_modules.webdata import WebDataModule
from r1v3.rl.rollout import Prompt, SamplingConfig, completion_mask
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.grpo import GRPOStage


def length_reward(items):
    """Varies within every group, so advantages are never all zero."""
    return [{"reward": min(len(it["response"]) / 50.0, 1.0), "accuracy": 0.0, "format": 0.0} for it in items]


def make_stage(tiny_dirs, family="internvl", **kwargs):
    kwargs.setdefault("sampling", SamplingConfig(n=4, max_new_tokens=12))
    kwargs.setdefault("reward_fn", "test_grpo.length_reward")
    kwargs.setdefault("optimizer", OptimizerConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"))
    kwargs.setdefault("rollout_log_every", 0)
    return GRPOStage(str(tiny_dirs[family]), **kwargs)


def run(stage, synth_dir, steps, batch_size=2):
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=batch_size)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      log_every_n_steps=1)
    trainer.fit(stage, datamodule=data)
    return trainer


def test_completion_mask_and_finish_reasons():
    eos, pad = 9, 0
    ids = torch.tensor([[5, 6, 9, 0], [5, 6, 7, 8], [5, 0, 0, 0]])
    mask, reasons = completion_mask(ids, eos, pad, max_new_tokens=4, has_stop_strings=True)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert reasons == ["stop", "length", "stop"]


def test_engine_logprobs_match_the_trainer(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs)
    stage.setup("fit")
    stage.configure_model()
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=2)
    data.processor = stage.processor
    data.collate_mode = "prompt"
    data.setup("fit")
    meta = next(iter(data.train_dataloader()))["meta"]
    prompts = [Prompt(t, i) for t, i in zip(meta["prompt_text"], meta["pil_images"])]
    rollouts = stage.engine.generate(prompts, SamplingConfig(n=3, max_new_tokens=10), seed=1)
    assert rollouts.completion_ids.shape[0] == 6 and len(rollouts.texts) == 6
    assert set(rollouts.finish_reasons) <= {"stop", "length"}
    logp, entropy = stage.policy_logprobs(stage.record(prompts, rollouts), torch.arange(6), with_grad=False)
    mask = rollouts.completion_mask.bool()
    assert torch.allclose(logp[mask], rollouts.logprobs[mask], atol=1e-4)
    assert (entropy[mask] > 0).all() and (entropy[mask] <= torch.log(torch.tensor(len(stage.tokenizer)))).all()
    from r1v3.backbone import multimodal_token_ids

    banned = torch.tensor(multimodal_token_ids(stage.processor))
    assert len(banned) == 4 and not torch.isin(rollouts.completion_ids[mask], banned).any()
    again = stage.engine.generate(prompts, SamplingConfig(n=3, max_new_tokens=10), seed=1)
    assert again.texts == rollouts.texts, "same seed, same rollouts"


def test_gradient_reaches_the_connector(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs)
    grads = []
    stage.setup("fit")
    stage.configure_model()
    for p in stage.backbone.module("connector").parameters():
        p.register_hook(lambda g: grads.append(float(g.norm())))
    trainer = run(stage, synth_dir, 1)
    assert trainer.global_step == 1
    assert grads and max(grads) > 0
    metrics = trainer.callback_metrics
    for key in ("train/reward_mean", "train/entropy", "train/clip_frac", "train/rollout_s",
                "train/update_tokens_per_s", "train/zero_variance_groups", "train/ratio_mean"):
        assert key in metrics, key
    assert float(metrics["train/clip_frac"]) == 0.0  # on-policy: the ratio is exactly 1


def test_connector_only_freeze_plan_changes_only_the_connector(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs, "qwen2_5_vl", trainable=["connector"])
    stage.setup("fit")
    stage.configure_model()
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    run(stage, synth_dir, 2)
    changed = {n for n, p in stage.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.startswith("model.visual.merger.") for n in changed)


def test_off_policy_updates_and_kl_reference(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs, "llava", num_iterations=2, mini_batches=2, kl_coef=0.1,
                       kl_estimator="k2", micro_batch_tokens=64)
    trainer = run(stage, synth_dir, 4)
    assert trainer.global_step == 4  # 2 iterations × 2 mini-batches from one rollout batch
    assert stage.reference is not None
    metrics = trainer.callback_metrics
    assert float(metrics["train/kl_ref"]) >= 0
    assert float(metrics["train/ratio_max"]) != 1.0 or float(metrics["train/ratio_min"]) != 1.0


def test_truncation_zero_scores_cut_completions_zero(tiny_dirs, synth_dir):
    stage = make_stage(tiny_dirs, sampling=SamplingConfig(n=2, max_new_tokens=1), truncation="zero")
    trainer = run(stage, synth_dir, 1)
    # a random tiny model practically never emits EOS as its first token
    assert float(trainer.callback_metrics["train/truncation_rate"]) > 0.5
    assert float(trainer.callback_metrics["train/reward_mean"]) < 0.05


def test_rollout_table_is_written(tiny_dirs, synth_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    stage = make_stage(tiny_dirs, rollout_log_every=1, rollout_seed=5)
    # a logger merges module and data hparams: their seeds must not collide
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=2, seed=3)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    import json

    lines = (tmp_path / "lightning_logs" / "version_0" / "rollouts.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    assert {"question", "completion", "extracted", "reward", "image"} <= row.keys()
    assert len(lines) == 2 * 8  # 2 steps × (2 prompts × 4 samples)


def test_vllm_rollout_without_vllm_is_one_clear_error(tiny_dirs):
    import pytest

    from r1v3.backbone import BackboneError
    from r1v3.rl.vllm_engine import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here; this checks the message a core install gives")
    with pytest.raises(BackboneError, match="setup_vllm.sh"):
        make_stage(tiny_dirs, rollout="vllm")


class GradientRecorder:
    """Optimizer stand-in for calling ``GRPOStage.update`` outside a Trainer: ``step`` keeps the
    gradients it would have applied, and the weights never move."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"lr": 0.0}]
        self.grads: list[torch.Tensor] = []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]


def test_micro_batch_cut_leaves_the_gradient_unchanged(tiny_dirs, synth_dir):
    # 8 rows of uneven length, 3 truncated and masked out of the loss (DAPO's overlong filtering):
    # seq-mean-token-mean averages over the 5 rows that keep tokens. Weighting each micro-batch by
    # its share of all 8 rows made the gradient depend on the token budget (0.16 relative apart).
    stage = make_stage(tiny_dirs, truncation="mask", max_grad_norm=0.0)
    stage.setup("fit")
    stage.configure_model()
    params = [p for p in stage.model.parameters() if p.requires_grad]
    recorder = GradientRecorder(params)
    stage.optimizers = lambda: recorder
    stage.lr_schedulers = lambda: type("NoSchedule", (), {"step": lambda self: None})()
    stage.manual_backward = lambda loss: loss.backward()
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=2)
    data.processor, data.collate_mode = stage.processor, "prompt"
    data.setup("fit")
    meta = next(iter(data.train_dataloader()))["meta"]
    prompts = [Prompt(t, i) for t, i in zip(meta["prompt_text"], meta["pil_images"])]
    rollouts = stage.engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=8), seed=3)
    lengths = torch.tensor([8, 3, 5, 8, 2, 7, 6, 4])
    rollouts.completion_mask = (torch.arange(8)[None] < lengths[:, None]).long()
    truncated = torch.tensor([False, True, False, False, True, False, True, False])
    loss_mask = rollouts.completion_mask.float() * (~truncated).float()[:, None]
    advantages = torch.tensor([0.9, -1.2, 0.4, -0.3, 1.1, -0.7, 0.2, -1.4])
    rows = torch.arange(8)
    step = stage.record(prompts, rollouts)
    step.advantages, step.loss_mask = advantages, loss_mask

    def cuts(budget):
        stage.hparams.micro_batch_tokens = budget
        return len(stage.micro_batches(step, rows))

    def gradient(budget):
        cut = cuts(budget)
        stage.update(step, rows)
        return cut, torch.cat([g.flatten() for g in recorder.grads])

    one_cut, whole = gradient(100_000)
    four_cut, split = gradient(next(b for b in range(8, 4096) if cuts(b) == 4))
    assert (one_cut, four_cut) == (1, 4)
    assert whole.norm() > 0
    # fp32: the two differ only by summation order (observed ~1e-7)
    assert float((split - whole).norm() / whole.norm()) < 1e-5


@pytest.mark.parametrize("setting", [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}])
def test_checkpoint_generation_settings_do_not_reach_rollouts(tiny_dirs, synth_dir, tmp_path, setting, caplog):
    # Released checkpoints ship sampling settings in generation_config.json. transformers applies
    # them to any generate call that leaves them unset, and the trainer scores the plain softmax:
    # greedy rollouts must be the trainer's argmax at every position.
    import json
    import shutil

    from r1v3.rl import scoring

    model_dir = shutil.copytree(tiny_dirs["qwen2_5_vl"], tmp_path / "released")
    config_file = model_dir / "generation_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | setting))
    with caplog.at_level("WARNING"):
        stage = GRPOStage(str(model_dir), sampling=SamplingConfig(n=2, max_new_tokens=16),
                          reward_fn="test_grpo.length_reward", rollout_log_every=0)
        stage.setup("fit")
        stage.configure_model()
    assert any(next(iter(setting)) in r.getMessage() and "ignores" in r.getMessage() for r in caplog.records)
    from transformers import GenerationConfig

    from r1v3.rl.rollout import checkpoint_sampling_settings

    # Token ids and bookkeeping entries are no sampling settings: a plain checkpoint warns of nothing.
    assert checkpoint_sampling_settings(GenerationConfig.from_pretrained(tiny_dirs["qwen2_5_vl"])) == {}
    assert checkpoint_sampling_settings(GenerationConfig.from_pretrained(model_dir)) == setting
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=2)
    data.processor, data.collate_mode = stage.processor, "prompt"
    data.setup("fit")
    meta = next(iter(data.train_dataloader()))["meta"]
    prompts = [Prompt(t, i) for t, i in zip(meta["prompt_text"], meta["pil_images"])]
    greedy = stage.engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=16))
    step = stage.record(prompts, greedy)
    with torch.no_grad():  # the trainer's greedy choice: the argmax of the logits it scores
        logits = scoring.prefix.rows_completion_logits(stage.model, step.encoded, [0, 1], greedy.completion_ids,
                                                       greedy.completion_mask, "cpu")
    mask = greedy.completion_mask.bool()
    assert mask.sum() >= 16
    assert torch.equal(logits.argmax(-1)[mask], greedy.completion_ids[mask])
    assert stage.model.generation_config.to_diff_dict().items() >= setting.items(), "the export keeps them"


def test_a_completion_holding_an_image_placeholder_is_dropped_and_counted(tiny_dirs, synth_dir):
    # Both engines ban placeholders; this engine forges one into a completion anyway (an engine
    # bug, a custom engine), which must be dropped before any forward pass sees it.
    from r1v3.rl.rollout import HFGenerateEngine

    class ForgingEngine(HFGenerateEngine):
        def generate(self, *args, **kwargs):
            rollouts = super().generate(*args, **kwargs)
            rollouts.completion_ids[1, 0] = placeholder
            self.forged = rollouts.completion_ids.clone(), rollouts.completion_mask.clone()
            return rollouts

    stage = make_stage(tiny_dirs)
    stage.setup("fit")
    stage.configure_model()
    placeholder = stage.model.config.image_token_id  # the token image features are scattered into
    assert placeholder in stage.placeholder_ids
    stage.engine = ForgingEngine(stage.model, stage.encoder, stage.tokenizer, suppress_tokens=stage.placeholder_ids)
    trainer = run(stage, synth_dir, 1)
    assert trainer.global_step == 1
    assert float(trainer.callback_metrics["train/dropped_placeholder_completions"]) == 1.0
    step = stage.last_rollouts
    assert step.rollouts.completion_mask[1].sum() == 0 and step.rollouts.finish_reasons[1] == "dropped"
    assert step.texts[1] == "" and step.scores[1]["reward"] == 0.0
    assert step.rollouts.completion_mask[[0, 2, 3]].sum() > 0, "the rest of the group stays"
    # Fed back as it was, the forged row asks for image features that do not exist: the per-row
    # pass (FSDP, gradient checkpointing) fails on it (the shared pass would read it as text).
    from r1v3.rl import prefix

    ids, mask = stage.engine.forged
    tokens, images = step.encoded.batch([0])
    with pytest.raises(Exception, match="(?i)image"):
        prefix.per_row_completion_logits(stage.model, tokens, images, ids[1:2], mask[1:2], stage.tokenizer.pad_token_id)
