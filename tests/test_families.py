"""The current families (Qwen3-VL dense and MoE, InternVL3.5 over Qwen3 and Qwen3-MoE) train: a short
SFT lowers the loss and a GRPO step reaches the connector, DeepStack mergers included; a MoE
router's load-balancing loss is on or off by config and logged."""

import pytest
import torch
from lightning.pytorch import Trainer

from r1v3 import backbone as bb
from r1v3.backbone import LoadConfig
from r1v3.data_modules.webdata import WebDataModule
from r1v3.rl.rollout import SamplingConfig
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.grpo import GRPOStage
from r1v3.stages.sft import SFTStage

NEW = ("internvl3_5", "internvl3_5_moe", "qwen3_vl", "qwen3_vl_moe")
MOE = ("internvl3_5_moe", "qwen3_vl_moe")


def trainer(steps):
    return Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)


def connector_grads(stage) -> dict[str, list[float]]:
    """Gradient norms of each connector prefix's parameters, recorded as backward runs."""
    stage.configure_model()
    grads: dict[str, list[float]] = {}
    for name, param in stage.backbone.group_parameters()["connector"]:
        prefix = next(p for p in stage.backbone.groups["connector"] if name.startswith(p))
        param.register_hook(lambda g, prefix=prefix: grads.setdefault(prefix, []).append(float(g.norm())))
    return grads


def test_presets_carry_the_released_settings(tiny_dirs):
    qwen3 = bb.load_backbone(tiny_dirs["qwen3_vl"])
    image = qwen3.processor.image_processor
    assert image.patch_size == 16 and image.size["longest_edge"] > image.size["shortest_edge"]
    assert list(image.image_mean) == [0.5] * 3
    assert qwen3.model.config.text_config.rope_parameters["mrope_interleaved"]
    assert len(qwen3.model.model.visual.deepstack_merger_list) == 2
    internvl = bb.load_backbone(tiny_dirs["internvl3_5_moe"])
    assert internvl.family == "internvl" and internvl.model.config.text_config.model_type == "qwen3_moe"
    assert internvl.processor.image_processor.crop_to_patches and internvl.processor.image_processor.max_patches == 12


@pytest.mark.parametrize("family", NEW)
def test_sft_learns_and_grpo_reaches_the_connector(tiny_dirs, synth_dir, family):
    moe = family in MOE
    load = LoadConfig(router_aux_loss_coef=0.01 if moe else None)
    sft = SFTStage(str(tiny_dirs[family]), val_generate=False, load=load,
                   optimizer=OptimizerConfig(lr=3e-3, warmup_ratio=0.0, schedule="constant"))
    grads = connector_grads(sft)
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=8)
    losses = []
    sft.on_train_batch_end = lambda outputs, *_: losses.append(float(outputs["loss"]))
    run = trainer(12)
    run.fit(sft, datamodule=data)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert set(grads) == set(sft.backbone.groups["connector"]) and all(max(g) > 0 for g in grads.values())
    assert ("train/router_aux_loss" in run.callback_metrics) == moe

    grpo = GRPOStage(str(tiny_dirs[family]), load=load, sampling=SamplingConfig(n=4, max_new_tokens=8),
                     reward_fn="test_grpo.length_reward", rollout_log_every=0,
                     optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"))
    grads = connector_grads(grpo)
    run = trainer(1)
    run.fit(grpo, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    assert run.global_step == 1
    assert set(grads) == set(grpo.backbone.groups["connector"]) and all(max(g) > 0 for g in grads.values())
    if moe:
        assert float(run.callback_metrics["train/router_aux_loss"]) > 0


def test_router_loss_follows_the_checkpoint_unless_set(tiny_dirs, synth_dir):
    from r1v3.moe import RouterAuxLoss

    model = bb.load_backbone(tiny_dirs["qwen3_vl_moe"]).model.train()
    assert RouterAuxLoss(model, None).coef == 0.0, "released Qwen3-MoE configs leave output_router_logits off"
    model.config.text_config.output_router_logits = True
    on = RouterAuxLoss(model, None)
    assert on.coef == model.config.text_config.router_aux_loss_coef > 0
    assert not model.config.text_config.output_router_logits, "r1v3 adds the loss, transformers must not"
    ids = torch.randint(10, 200, (2, 7))
    out = model(input_ids=ids, output_router_logits=True)  # transformers' own aux loss, for this one forward
    out.logits.sum().backward()
    loss = on.pop()
    assert loss is not None and loss.requires_grad
    assert torch.allclose(loss, on.coef * out.aux_loss), (float(loss), float(out.aux_loss))
    assert on.pop() is None, "each forward's logits count once"
    with torch.no_grad():
        model(input_ids=ids)
    assert on.pop() is None, "no-grad forwards (rollouts, old log-probs) add nothing"


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_is_refused_with_the_reason(tmp_path, model_type):
    (tmp_path / "config.json").write_text('{"model_type": "%s"}' % model_type)
    with pytest.raises(bb.BackboneError, match="not supported: its hybrid layers keep a linear-attention state"):
        bb.load_backbone(tmp_path)
