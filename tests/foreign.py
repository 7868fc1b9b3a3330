"""Checkpoints as other programs save them: plain transformers classes and files, no r1v3 builder.

They carry what released checkpoints carry and r1v3's own tiny models do not:
- InternVL tiles each image (``crop_to_patches``, up to ``max_patches`` crops plus a thumbnail);
  its ``processor_config.json`` names a processor class transformers does not know (as remote-code
  exports do), and the image processor is recorded as the ``Fast`` one, which needs torchvision.
- Qwen2.5-VL resizes dynamically between two pixel bounds; like the hub's Qwen2.5-VL directories it
  has no ``processor_config.json`` at all: the processor class is named in
  ``preprocessor_config.json``.
- Neither has a video-processor file, the chat template lives in the tokenizer's files, and the
  Qwen2.5-VL directory has no ``generation_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

# head_dim 32: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, … (not 16).

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = {
    "internvl": ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}
IMAGE = {"internvl": "'<IMG_CONTEXT>'", "qwen2_5_vl": "'<|vision_start|><|image_pad|><|vision_end|>'"}


def _tokenizer(family: str, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *SPECIALS[family]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    words = "how many red blue green shapes are there the answer is one two three four five six seven".split()
    bpe.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    named = {"internvl": {"start_image_token": "<img>", "end_image_token": "</img>",  # as InternVL3-hf has
                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}.get(family, {})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>", padding_side="left", extra_special_tokens=named,
                                        chat_template=TEMPLATE.replace("IMAGE", IMAGE[family]))
    tokenizer.save_pretrained(str(out))
    return tokenizer


def build_internvl(out: Path, tiles: int = 4) -> Path:
    from transformers import (AutoModelForImageTextToText, GotOcr2ImageProcessorPil, InternVLConfig,
                              InternVLVisionConfig, Qwen2Config)

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer("internvl", out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS["internvl"]}
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  patch_size=[8, 8], image_size=[32, 32])
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                            image_seq_length=4, downsample_ratio=0.5)
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(out))
    GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                             max_patches=tiles).save_pretrained(str(out))
    _edit(out / "preprocessor_config.json", image_processor_type="GotOcr2ImageProcessorFast")
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLChatProcessor", "image_seq_length": 4}))
    return out


def build_qwen2_5_vl(out: Path) -> Path:
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer("qwen2_5_vl", out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS["qwen2_5_vl"]}
    text = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=128, window_size=32, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(out))
    # Dynamic resolution: 4 to 64 merged 16-px patches, whatever the image's size.
    Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 4 * 256, "longest_edge": 64 * 256}).save_pretrained(str(out))
    _edit(out / "preprocessor_config.json", image_processor_type="Qwen2VLImageProcessor",
          processor_class="Qwen2_5_VLProcessor")
    (out / "generation_config.json").unlink()  # optional, and some exports leave it out
    return out


def _edit(path: Path, **fields) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | fields, indent=1))


BUILDERS = {"internvl": build_internvl, "qwen2_5_vl": build_qwen2_5_vl}
