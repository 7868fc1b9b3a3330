import json

import pytest
import torch
from PIL import Image

from r1v3 import backbone as bb
from r1v3 import chat
from r1v3.tools import tiny


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tiny_preset_is_small_and_generates(tiny_dirs, family):
    meta = json.loads((tiny_dirs[family] / "r1v3_tiny.json").read_text())
    assert meta["params"] <= 1_000_000
    backbone = bb.load_backbone(tiny_dirs[family])
    tok = backbone.tokenizer
    for token in ("<think>", "</think>"):
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
        assert tok.decode(tok(token, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == token
    prompt = chat.render_prompt(backbone.processor, "<image>\nHow many red shapes?", 1)
    assert tiny.IMAGE_PLACEHOLDER[family] in prompt
    kwargs = {"crop_to_patches": False} if family == "internvl" else {}
    enc = backbone.processor(text=[prompt], images=[[Image.new("RGB", (64, 64), "white")]],
                             return_tensors="pt", **kwargs)
    out = backbone.model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4 or tok.eos_token_id in out[0]


def test_small_preset_size(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    corpus = ["<think>I count 3 shapes. Wait, let me recount.</think> The answer is \\boxed{3}."] * 200
    tokenizer = tiny.build_tokenizer("qwen2_5_vl", corpus, 2048)
    config = tiny.build_config("qwen2_5_vl", tiny.PRESETS["small"], tokenizer)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert 20_000_000 <= n <= 32_000_000
    assert config.text_config.hidden_size == 512 and config.text_config.num_hidden_layers == 8
    assert config.text_config.num_key_value_heads == 2
    assert AutoConfig.for_model  # config classes, no download


def test_tiny_cli_rejects_unknown_family(capsys):
    with pytest.raises(SystemExit):
        tiny.tiny_main(["--family", "gpt5", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


def test_real_setting_presets(real_dirs, capsys):
    tiled = bb.load_backbone(real_dirs["internvl_tiled"])
    assert tiled.model.config.text_config.vocab_size == len(tiled.tokenizer) >= 151_000
    text = "<think>I count 3 red shapes.</think> The answer is \\boxed{3}."
    assert tiled.tokenizer.decode(tiled.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    image = tiled.processor.image_processor
    assert image.crop_to_patches and image.max_patches == 4
    qwen = bb.load_backbone(real_dirs["qwen2_5_vl_dynamic"]).processor.image_processor
    assert qwen.size["longest_edge"] > qwen.size["shortest_edge"], "a range of resolutions, not one"
    with pytest.raises(SystemExit):
        tiny.tiny_main(["--family", "qwen2_5_vl", "--tiles", "4", "--out", "x"])
    assert "--tiles is for the InternVL families" in capsys.readouterr().err
