"""LoRA through peft in every stage, on real tiny models: it trains, only adapters and the fully
trained groups move, the exports load in plain transformers and in peft, the KL reference is the
policy with its adapters off, and it works with checkpointing, bf16 and the shared prompt pass.

LoRA adapts a trained base, so the learning checks start from the shared weak SFT export
(``conftest.sft_start``). On the random tiny model a frozen head bounds what an adapter can do:
its logits are a random 128-wide head over a normalised hidden state, under ±2.5 (measured: LoRA
alone stalls at 5.1 nats there, from 6.2).
"""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from safetensors import safe_open
from test_grpo_variants import Curves

from r1v3.backbone import BackboneError, LoadConfig
from r1v3.data_modules.webdata import WebDataModule
from r1v3.lora import LoraConfig, is_adapter_param
from r1v3.rl.rollout import Prompt, SamplingConfig
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.grpo import GRPOStage
from r1v3.stages.sft import SFTStage

ADAPT_LLM = dict(trainable=["connector"], lora=LoraConfig(groups=["llm"], r=16, alpha=32))


def first_batch(stage, data_dir, batch_size=16, mode="sft"):
    data = WebDataModule(train=str(data_dir / "train"), batch_size=batch_size)
    data.processor, data.collate_mode = stage.processor, mode
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def trainer(steps, **kwargs):
    return Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   log_every_n_steps=1, **kwargs)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch["inputs"], **batch["images"]).logits


@pytest.mark.slow
def test_lora_sft_learns_and_exports_merged_and_adapter(sft_start, synth_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base_dir, _ = sft_start
    seed_everything(0)
    stage = SFTStage(str(base_dir), val_generate=False, export_dir=str(tmp_path / "export"),
                     optimizer=OptimizerConfig(lr=4e-3, warmup_ratio=0.0), **ADAPT_LLM)
    stage.configure_model()
    before = weights(stage.model)
    trainer(150).fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=8))
    start = SFTStage(str(base_dir))
    start.configure_model()
    batch = first_batch(stage, synth_dir)
    with torch.no_grad():  # the check of the full fine-tune's test (tests/test_sft.py), from the start model
        assert stage.supervised_loss(batch) < 0.6 * start.supervised_loss(batch)
    changed = moved(stage.model, before)
    assert changed == {n for n in before if is_adapter_param(n) or stage.backbone.group_of(n) == "connector"}

    stage.model.eval()
    policy = logits(stage.model, batch)
    export = tmp_path / "export"
    merged = AutoModelForImageTextToText.from_pretrained(export).eval()
    assert (logits(merged, batch) - policy).abs().max() <= 1e-5 * policy.abs().max()
    with safe_open(str(export / "model.safetensors"), "pt") as got, \
            safe_open(str(base_dir / "model.safetensors"), "pt") as want:
        assert set(got.keys()) == set(want.keys()), "the merged export has the base checkpoint's names"
    # base + adapter through peft's own loader (the connector, trained fully, comes from the export)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    connector = {k: v for k, v in merged.state_dict().items() if stage.backbone.group_of(k) == "connector"}
    assert connector and not base.load_state_dict(connector, strict=False).unexpected_keys
    adapted = PeftModel.from_pretrained(base, export / "adapter").eval()
    assert (logits(adapted, batch) - policy).abs().max() <= 1e-5 * policy.abs().max()


@pytest.mark.slow
def test_lora_grpo_raises_the_training_reward(sft_start):
    # tests/test_grpo_variants.py's check for the full fine-tune, with the KL to the reference
    # (the policy with its adapters off) in the loss. The head is adapted too: what rises first
    # here is the format reward, i.e. closing </think> in time, which the full fine-tune learns
    # in the head's rows; without a head adapter the reward stayed flat over 160 steps (measured).
    model_dir, data_dir = sft_start
    seed_everything(0)
    lora = LoraConfig(groups=["llm"], r=16, alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    stage = GRPOStage(str(model_dir), sampling=SamplingConfig(n=4, max_new_tokens=24), rollout_log_every=0,
                      mini_batches=2, kl_coef=0.01, trainable=["connector"], lora=lora,
                      optimizer=OptimizerConfig(lr=3e-3, warmup_ratio=0.15, schedule="constant"))
    stage.setup("fit")
    stage.configure_model()
    before = weights(stage.model)
    curves = Curves()
    trainer(40, callbacks=[curves]).fit(stage, datamodule=WebDataModule(train=str(data_dir / "train"), batch_size=8))
    rewards = [r["train/reward_mean"] for r in curves.rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05, rewards
    assert stage.reference is None, "no second copy of the model"
    assert all(r["train/kl_ref"] >= 0 for r in curves.rows) and curves.rows[-1]["train/kl_ref"] > 0
    changed = moved(stage.model, before)
    assert changed and all(is_adapter_param(n) or stage.backbone.group_of(n) == "connector" for n in changed)


def test_the_reference_is_the_policy_with_adapters_off(tiny_dirs, synth_dir):
    from r1v3.backbone import load_backbone

    stage = GRPOStage(str(tiny_dirs["internvl"]), kl_coef=0.1, sampling=SamplingConfig(n=2, max_new_tokens=8),
                      **ADAPT_LLM)
    stage.setup("fit")
    stage.configure_model()
    with torch.no_grad():  # a trained policy: adapters and connector away from the start
        for name, p in stage.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    meta = first_batch(stage, synth_dir, 2, "prompt")["meta"]
    prompts = [Prompt(t, i) for t, i in zip(meta["prompt_text"], meta["pil_images"])]
    step = stage.record(prompts, stage.engine.generate(prompts, stage.sampling, seed=0))
    rows = torch.arange(len(step.texts))
    policy = stage.policy_logprobs(step, rows, with_grad=False, with_entropy=False)[0]

    used = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: used.add(mod.weight.data_ptr()))
             for m in stage.model.modules() if isinstance(m, torch.nn.Linear)]
    reference = stage.reference_logprobs(step)
    for hook in hooks:
        hook.remove()
    assert stage.reference is None and stage.reference_model() is stage.model
    own = {p.data_ptr() for p in stage.model.parameters()}
    assert used and used <= own, "every reference matmul read the policy's own weights"

    base = load_backbone(tiny_dirs["internvl"]).model.eval()
    mask = step.rollouts.completion_mask.bool()
    expected = stage.reference_logprobs(step, model=base)
    assert (reference - expected)[mask].abs().max() < 1e-5
    assert (policy - expected)[mask].abs().max() > 1e-3, "the adapters change the policy"
    after = stage.policy_logprobs(step, rows, with_grad=False, with_entropy=False)[0]
    assert torch.equal(after, policy), "adapters back on and the connector restored"
    assert all(p.requires_grad == (is_adapter_param(n) or stage.backbone.group_of(n) == "connector")
               for n, p in stage.model.named_parameters())


@pytest.mark.parametrize("options", [{"precision": "bf16-mixed"}, {"load": LoadConfig(gradient_checkpointing=True)}])
def test_lora_trains_under_bf16_and_checkpointing(tiny_dirs, synth_dir, options):
    precision = options.pop("precision", "32-true")
    stage = SFTStage(str(tiny_dirs["qwen2_5_vl"]), val_generate=False, **options,
                     optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0), **ADAPT_LLM)
    stage.configure_model()
    before = weights(stage.model)
    run = trainer(3, precision=precision)
    run.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=4))
    changed = moved(stage.model, before)
    assert any(".lora_B." in n for n in changed) and any(stage.backbone.group_of(n) == "connector" for n in changed)
    assert all(is_adapter_param(n) or stage.backbone.group_of(n) == "connector" for n in changed)
    assert torch.isfinite(run.callback_metrics["train/loss"])


@pytest.mark.parametrize("family", ["internvl", "qwen3_vl_moe"])
def test_shared_prompt_pass_with_adapters_matches_per_row(tiny_dirs, synth_dir, family):
    # tests/test_prefix.py's fp32 comparison, on an adapted, checkpointed policy
    from test_prefix import TOLERANCE, load, loss_and_grads

    from r1v3 import lora
    from r1v3.rl import prefix

    backbone, encoder, prompts = load(tiny_dirs, synth_dir, family)
    lora.attach(backbone, LoraConfig(groups=["llm", "vision"], r=4), trainable=["connector"])
    model = backbone.model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert prefix.shares_prompts(model)
    gen = torch.Generator().manual_seed(0)
    owners, ids = [0, 0, 1, 1], torch.randint(10, 200, (4, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = backbone.tokenizer.pad_token_id
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    tokens, images = encoder.encode_prompts([prompts[p].text for p in (0, 1)], [prompts[p].images for p in (0, 1)])
    shared = loss_and_grads(model, prefix.completion_logits(model, tokens, images, torch.tensor(owners), ids, mask),
                            ids, mask, advantages)
    tokens, images = encoder.encode_prompts([prompts[p].text for p in owners], [prompts[p].images for p in owners])
    plain = loss_and_grads(model, prefix.per_row_completion_logits(model, tokens, images, ids, mask,
                                                                   backbone.tokenizer.pad_token_id),
                           ids, mask, advantages)
    assert (shared[0] - plain[0]).abs().max() <= TOLERANCE["fp32"]["logp"] * plain[0].abs().max()
    assert shared[2].keys() == plain[2].keys() and any(".lora_A." in n for n in plain[2])
    assert all(is_adapter_param(n) or backbone.group_of(n) == "connector" for n in plain[2])
    total = torch.cat([g.flatten() for g in plain[2].values()])
    error = torch.cat([(shared[2][n] - g).flatten() for n, g in plain[2].items()])
    assert error.norm() <= TOLERANCE["fp32"]["grad"] * total.norm()


@pytest.mark.parametrize("lora, trainable, message", [
    (LoraConfig(groups=["llm"]), ["llm", "connector"], "both in `trainable`"),
    (LoraConfig(groups=["text"]), ["connector"], "unknown groups"),
    (LoraConfig(groups=["llm"], dropout=1.5), ["connector"], "dropout"),
    (LoraConfig(groups=["llm"], target_modules=["qkv"]), ["connector"], "matches target_modules"),
])
def test_a_bad_adapter_plan_is_one_clear_error(tiny_dirs, lora, trainable, message):
    with pytest.raises(BackboneError, match=message):
        SFTStage(str(tiny_dirs["internvl"]), trainable=trainable, lora=lora).configure_model()


def test_an_adapter_on_a_tied_head_is_refused(tmp_path):
    # the head's weight is the input embeddings': merging an adapter into it would change both
    from r1v3.tools.tiny import build_tiny

    model_dir = build_tiny("qwen2_5_vl", tmp_path / "tied", tied=True)
    stage = SFTStage(str(model_dir), trainable=[], lora=LoraConfig(groups=["llm"], target_modules=["lm_head"]))
    with pytest.raises(BackboneError, match="ties its output head"):
        stage.configure_model()
