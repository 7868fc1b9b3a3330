"""Checkpoints saved by other programs (tests/foreign.py): SFT and GRPO train on them with the
images reaching the model, or stop in one line; they never train without the images."""

import json
import shutil

import pytest
from lightning.pytorch import Callback, Trainer

from foreign import BUILDERS
from r1v3.backbone import BackboneError
from r1v3.data_modules.webdata import WebDataModule
from r1v3.rl.rollout import SamplingConfig
from r1v3.stages.grpo import GRPOStage
from r1v3.stages.sft import SFTStage


@pytest.fixture(scope="module")
def foreign_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    return {family: build(root / family) for family, build in BUILDERS.items()}


class ImageInputs(Callback):
    """Records, for every forward of the policy whose tokens hold the image token, whether the
    image tensors came with it."""

    def __init__(self):
        self.forwards: list[bool] = []

    def on_fit_start(self, trainer, stage):
        image_token = stage.model.config.image_token_id

        def look(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and bool((ids == image_token).any()):
                self.forwards.append(kwargs.get("pixel_values") is not None)

        self.hook = stage.model.register_forward_pre_hook(look, with_kwargs=True)

    def on_fit_end(self, trainer, stage):
        self.hook.remove()


def fit(stage, synth_dir, steps=1):
    seen = ImageInputs()
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[seen])
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    assert trainer.global_step == steps
    return seen.forwards


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_sft_and_grpo_train_with_the_images(foreign_dirs, synth_dir, family):
    model_dir = foreign_dirs[family]
    assert not (model_dir / "video_preprocessor_config.json").exists()
    sft = fit(SFTStage(str(model_dir), val_generate=False), synth_dir)
    assert sft and all(sft), "every SFT forward over image tokens gets the image tensors"
    grpo = fit(GRPOStage(str(model_dir), sampling=SamplingConfig(n=2, max_new_tokens=4), rollout_log_every=0),
               synth_dir)
    # the rollout prefill, the update's forward and the log-prob passes
    assert len(grpo) >= 2 and all(grpo), "every GRPO forward over image tokens gets the image tensors"


def test_image_settings_are_the_checkpoints_own(foreign_dirs):
    from PIL import Image

    from r1v3.chat import render_prompt

    stage = SFTStage(str(foreign_dirs["internvl"]))
    encoder = stage.prompt_encoder()
    assert encoder.image_kwargs == {"crop_to_patches": True, "max_patches": 4}, "tiling as the checkpoint sets it"
    text = render_prompt(stage.processor, "<image>\nHow many?", 1)
    wide, square = Image.new("RGB", (96, 40)), Image.new("RGB", (32, 32))
    encoded = encoder.encode_each([text, text], [[wide], [square]])
    assert encoded.images[0]["pixel_values"].shape[0] == 3, "a 2x1 grid of crops + a thumbnail"
    assert encoded.images[1]["pixel_values"].shape[0] == 1, "one tile, no thumbnail"

    qwen = SFTStage(str(foreign_dirs["qwen2_5_vl"])).prompt_encoder()
    text = render_prompt(qwen.processor, "<image>\nHow many?", 1)
    encoded = qwen.encode_each([text, text], [[Image.new("RGB", (128, 64))], [Image.new("RGB", (64, 64))]])
    assert encoded.length(0) - encoded.length(1) == 16, "dynamic resolution: twice the pixels, twice the tokens"


def test_a_processor_that_cannot_be_rebuilt_is_one_clear_error(foreign_dirs, tmp_path):
    # Unknown processor class, and a tokenizer without the image tokens the family's processor
    # needs: neither loads, and the stage says so before any training.
    model_dir = shutil.copytree(foreign_dirs["internvl"], tmp_path / "broken")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", "start_image_token", "end_image_token", "context_image_token"):
        config.pop(key, None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="does not load from its files either"):
        SFTStage(str(model_dir))


def test_a_processor_that_disagrees_with_the_model_stops_naming_the_sample(foreign_dirs, synth_dir, tmp_path):
    # The saved processor config lacks image_seq_length, so the family's processor takes its
    # default (256 tokens per tile) while the model makes 4 features per tile. transformers would
    # fail deep inside the forward pass; the collator stops first, in one line.
    from r1v3.errors import UserError

    model_dir = shutil.copytree(foreign_dirs["internvl"], tmp_path / "no_seq_length")
    (model_dir / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLChatProcessor"}))
    for stage in (SFTStage(str(model_dir), val_generate=False),
                  GRPOStage(str(model_dir), sampling=SamplingConfig(n=2, max_new_tokens=4), rollout_log_every=0)):
        with pytest.raises(UserError, match=r"sample '.+': its prompt holds 1\d\d\d image tokens but its 1 image"):
            fit(stage, synth_dir)


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_padding_free_chunked_scoring_equals_the_padded_whole_logits(foreign_dirs, synth_dir, family):
    """On checkpoints from elsewhere, with images that tile (InternVL) or resize (Qwen2.5-VL) to
    different token counts and completions of different lengths: the update's default scoring
    (padding-free rows, the head a chunk of positions at a time) gives the log-probs, entropies and
    gradients of padded rows through whole logits."""
    import torch

    from r1v3.rl import packing
    from r1v3.rl.rollout import Prompt
    from test_head import score

    stage = GRPOStage(str(foreign_dirs[family]), sampling=SamplingConfig(n=3, max_new_tokens=7), rollout_log_every=0)
    stage.setup("fit")
    stage.configure_model()
    assert packing.enabled(stage.model)
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=2)
    data.processor, data.collate_mode = stage.processor, "prompt"
    data.setup("fit")
    meta = next(iter(data.train_dataloader()))["meta"]
    prompts = [Prompt(text, [image.resize((96 + 96 * i, 64)) for image in images])
               for i, (text, images) in enumerate(zip(meta["prompt_text"], meta["pil_images"]))]
    rollouts = stage.engine.generate(prompts, stage.sampling, seed=3)
    for row, length in ((1, 2), (4, 5)):  # EOS early: right padding follows
        rollouts.completion_mask[row, length:] = 0
        rollouts.completion_ids[row, length:] = stage.tokenizer.pad_token_id
    step = stage.record(prompts, rollouts)
    assert step.encoded.length(0) != step.encoded.length(1), "the two images give different token counts"
    rows = torch.arange(6)
    with packing.disabled(stage.model):
        whole = score(stage, step, rows, 0)
    chunked = score(stage, step, rows, 5)
    assert (chunked[0] - whole[0]).abs().max() <= 1e-5 * whole[0].abs().max()
    assert (chunked[1] - whole[1]).abs().max() <= 1e-5 * whole[1].abs().max()
    assert chunked[2].keys() == whole[2].keys() and len(whole[2]) > 0
    total = torch.cat([g.flatten() for g in whole[2].values()])
    error = torch.cat([(chunked[2][n] - g).flatten() for n, g in whole[2].items()])
    assert error.norm() <= 1e-4 * total.norm(), float(error.norm() / total.norm())
