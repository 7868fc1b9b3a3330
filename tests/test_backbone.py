import pytest
import torch

from r1v3 import backbone as bb

CONNECTOR_CLASS = {
    "internvl": "InternVLMultiModalProjector",
    "qwen2_5_vl": "Qwen2_5_VLPatchMerger",
    "llava": "LlavaMultiModalProjector",
}


@pytest.mark.parametrize("family", sorted(CONNECTOR_CLASS))
def test_connector_group_is_the_projector(tiny_dirs, family):
    backbone = bb.load_backbone(tiny_dirs[family])
    assert backbone.family == family
    connector = backbone.module("connector")
    assert type(connector).__name__ == CONNECTOR_CLASS[family]
    groups = backbone.group_parameters()
    connector_ids = {id(p) for p in connector.parameters()}
    assert {id(p) for _, p in groups["connector"]} == connector_ids
    # every parameter is in exactly one group
    all_ids = [id(p) for params in groups.values() for _, p in params]
    assert len(all_ids) == len(set(all_ids)) == len(list(backbone.model.parameters()))
    if family == "qwen2_5_vl":  # the merger sits inside the vision tower but is not "vision"
        assert all(".merger." not in name for name, _ in groups["vision"])
        assert groups["vision"], "the rest of the tower stays in vision"


@pytest.mark.parametrize("family", sorted(CONNECTOR_CLASS))
def test_connector_only_freeze_plan(tiny_dirs, family):
    backbone = bb.load_backbone(tiny_dirs[family])
    counts = bb.apply_freeze_plan(backbone, ["connector"])
    trainable = {id(p) for p in backbone.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in backbone.module("connector").parameters()}
    assert counts["connector"]["trainable"] == counts["connector"]["total"] > 0
    assert counts["vision"]["trainable"] == counts["llm"]["trainable"] == 0
    # and back: everything trains
    bb.apply_freeze_plan(backbone, ["vision", "connector", "llm"])
    assert all(p.requires_grad for p in backbone.model.parameters())


def test_unknown_family_says_how_to_declare_groups():
    with pytest.raises(bb.BackboneError, match="groups"):
        bb.resolve_groups("mystery_vlm", None)


def test_declared_groups_must_cover_all_parameters(tiny_dirs):
    groups = {"vision": ["model.vision_tower."], "connector": ["model.multi_modal_projector."],
              "llm": ["model.language_model."]}  # lm_head forgotten
    with pytest.raises(bb.BackboneError, match="lm_head"):
        bb.load_backbone(tiny_dirs["internvl"], groups=groups)


def test_unknown_group_in_freeze_plan(tiny_dirs):
    backbone = bb.load_backbone(tiny_dirs["llava"])
    with pytest.raises(bb.BackboneError, match="unknown groups"):
        bb.apply_freeze_plan(backbone, ["projector"])


def test_flash_attention_needs_cuda_and_package():
    with pytest.raises(bb.BackboneError, match="flash"):
        bb.resolve_attn_implementation("flash_attention_2", "cpu")
    assert bb.resolve_attn_implementation(None) == "sdpa"


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(bb.BackboneError, match="r1v3 tiny"):
        bb.load_backbone(tmp_path / "nope")


def test_loads_in_bf16(tiny_dirs):
    backbone = bb.load_backbone(tiny_dirs["internvl"], dtype="bfloat16")
    assert next(backbone.model.parameters()).dtype == torch.bfloat16


def test_processor_saved_under_transformers_name(tiny_dirs):
    import json

    for family, expected in (("internvl", "InternVLProcessor"), ("qwen2_5_vl", "Qwen2_5_VLProcessor")):
        config = json.loads((tiny_dirs[family] / "processor_config.json").read_text())
        assert config["processor_class"] == expected


def test_an_unknown_processor_class_falls_back_on_the_model_type(tiny_dirs, tmp_path, caplog):
    # Another program saved the processor under a class name transformers does not know, and no
    # video-processor file: AutoProcessor alone returns a bare tokenizer, which drops the images.
    import json
    import shutil

    from PIL import Image

    from r1v3.encoding import PromptEncoder
    from r1v3.errors import UserError

    model_dir = shutil.copytree(tiny_dirs["internvl"], tmp_path / "elsewhere")
    (model_dir / "video_preprocessor_config.json").unlink(missing_ok=True)
    config = json.loads((model_dir / "processor_config.json").read_text())
    (model_dir / "processor_config.json").write_text(json.dumps(config | {"processor_class": "FancyVLProcessor"}))
    with caplog.at_level("WARNING"):
        processor = bb.load_processor(model_dir)
    assert hasattr(processor, "image_processor") and any("model_type" in r.getMessage() for r in caplog.records)
    image = Image.new("RGB", (64, 64), "red")
    from r1v3.chat import render_prompt

    text = render_prompt(processor, "<image>\nHow many?", 1)
    tokens, images = PromptEncoder(processor).encode_prompts([text], [[image]])
    assert "pixel_values" in images
    # A processor that cannot encode images is refused in one line, never trained on blind.
    with pytest.raises(UserError, match="no image processor"):
        PromptEncoder(processor.tokenizer).encode_prompts([text], [[image]])
