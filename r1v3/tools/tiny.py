"""Offline tiny VLMs: random weights, a BPE tokenizer trained on the synthetic corpus, a processor.

There is no model hub on our machines, so tests, benchmarks and the demo build their models here
from transformers config classes and save them with ``save_pretrained``.  Everything downstream then
loads them through :func:`r1v3.backbone.load_backbone`, the same path a real checkpoint takes.

Presets (per family):
- ``tiny``  — under 1M parameters, for unit tests and the CPU demo.
- ``small`` — the benchmark reference: text hidden 512 × 8 layers, 8 heads / 2 KV heads, a 4-layer
  vision tower, 64 image tokens per image, about 25–30M parameters.
- ``medium`` — ``small`` scaled to about 0.56B parameters, for the memory benchmark.

Options that give a preset the settings of released checkpoints, which the defaults do not have:
``tiles`` (InternVL's tiling: up to that many crops of the image plus a thumbnail), ``dynamic``
(Qwen2.5-VL's dynamic resolution: the token count follows the image's size), ``vocab`` (a
tokenizer of real size, ~150k entries) and ``tied`` (one matrix for input and output embeddings).

The current families build with their released image settings from the start: ``qwen3_vl`` and
``qwen3_vl_moe`` (Qwen3-VL: 16-px patches, dynamic resolution, DeepStack mergers, interleaved
multimodal RoPE) and ``internvl3_5``/``internvl3_5_moe`` (InternVL3.5: transformers' ``internvl``
over a Qwen3 or Qwen3-MoE language model, tiling up to 12 crops). The MoE presets have 4 experts,
2 active per token.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from r1v3.moe import write_released_layout
from r1v3.processors import (InternVLProcessorNoVideo, Qwen2_5_VLProcessorNoVideo, Qwen3VLProcessorNoVideo,
                             save_processor)

FAMILIES = ("internvl", "internvl3_5", "internvl3_5_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava")
# The transformers model_type each preset family saves (InternVL3.5 is an ``internvl`` checkpoint).
MODEL_TYPE = {"internvl3_5": "internvl", "internvl3_5_moe": "internvl"}
# What the released checkpoints of a family do with images, unless the caller says otherwise.
DEFAULT_TILES = {"internvl3_5": 12, "internvl3_5_moe": 12}
DYNAMIC_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN3_VL = ("qwen3_vl", "qwen3_vl_moe")
# A tiny mixture of experts: 4 experts, 2 active per token, every layer sparse. Each expert's width
# is 1/8 of the dense MLP's, so the fused gate/up matrix is never square: transformers tells a
# released Qwen3-VL-MoE checkpoint's transposed layout from its own by shape alone.
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True)
SIZES = ("tiny", "small", "medium")
QWEN3_PATCH = 16  # Qwen3-VL's released patch size, at every preset size

# Chat markers shared by every tiny family (ChatML, as Qwen2 and InternVL3 use).
BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_TOKENS = ("<think>", "</think>")

# What the chat template writes for one image, per family; the processor expands it to the
# image's full run of tokens.
IMAGE_PLACEHOLDER = {
    "internvl": "<IMG_CONTEXT>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
}
FAMILY_TOKENS = {
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>",
                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    "qwen2_5_vl": {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                   "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    "llava": {"image_token": "<image>"},
}
for _family, _like in (("internvl3_5", "internvl"), ("internvl3_5_moe", "internvl"), ("qwen3_vl", "qwen2_5_vl"),
                       ("qwen3_vl_moe", "qwen2_5_vl")):
    IMAGE_PLACEHOLDER[_family], FAMILY_TOKENS[_family] = IMAGE_PLACEHOLDER[_like], FAMILY_TOKENS[_like]


def chat_template(family: str) -> str:
    """A ChatML template that renders ``{"type": "image"}`` parts as the family's placeholder."""
    image = IMAGE_PLACEHOLDER[family]
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


@dataclass(frozen=True)
class Preset:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    patch: int
    image_size: int
    vocab_size: int


PRESETS = {
    # 64 px images, patch 8: 64 patches -> 16 image tokens (InternVL pixel shuffle, Qwen 2x2 merge).
    "tiny": Preset(128, 2, 4, 2, 256, 64, 2, 4, 128, 8, 64, 512),
    # 128 px, patch 8: 256 patches -> 64 image tokens for InternVL and Qwen2.5-VL.
    "small": Preset(512, 8, 8, 2, 1408, 256, 4, 4, 1024, 8, 128, 2048),
    # ``small`` scaled to ~0.56B parameters (text hidden 1024 × 28 layers): the memory benchmark's
    # model, big enough that per-parameter costs dominate fixed ones.
    "medium": Preset(1024, 28, 16, 4, 5632, 256, 4, 4, 1024, 8, 128, 2048),
}


def _fallback_corpus() -> list[str]:
    from r1v3.data_modules import synthetic

    return synthetic.corpus(n=3000, seed=0)


def build_tokenizer(family: str, corpus: Sequence[str], vocab_size: int):
    """Train a byte-level BPE on ``corpus`` and wrap it with the family's special tokens. A corpus
    too small to learn ``vocab_size`` entries gets the rest as merges of learnt tokens
    (:func:`_grow_vocabulary`), so a real-size vocabulary costs seconds, not a large corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *FAMILY_TOKENS[family].values()]
    specials = list(dict.fromkeys(specials))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat scaffolding is in every prompt: give it whole-word merges.
    scaffold = ["user\n", "assistant\n", "system\n", "The answer is", "Wait, let me recount."] * 50
    bpe.train_from_iterator([*corpus, *scaffold], trainer=trainer)
    if bpe.get_vocab_size() < vocab_size:
        bpe = _grow_vocabulary(bpe, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=FAMILY_TOKENS[family],
        padding_side="left",
        chat_template=chat_template(family),
    )
    # Think tags are ordinary added tokens: kept by decode(skip_special_tokens=True).
    tokenizer.add_tokens(list(THINK_TOKENS))
    return tokenizer


def _grow_vocabulary(bpe, vocab_size: int):
    """Extend a trained BPE to ``vocab_size`` entries with merges of its own tokens, appended after
    the learnt ones (so they rank last): a vocabulary and merge table of real size, as the
    embedding, the logits and the rollout engine's token bans see them."""
    from tokenizers import Tokenizer

    spec = json.loads(bpe.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    specials = {t["content"] for t in spec["added_tokens"]}
    parts = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    next_id = max(vocab.values()) + 1
    for left in parts:
        for right in parts:
            if next_id >= vocab_size:
                spec["model"]["vocab"], spec["model"]["merges"] = vocab, merges
                return Tokenizer.from_str(json.dumps(spec))
            if left + right not in vocab:
                vocab[left + right] = next_id
                merges.append([left, right])
                next_id += 1
    raise ValueError(f"cannot grow the vocabulary to {vocab_size} entries")


def build_processor(family: str, tokenizer, preset: Preset, tiles: int = 1, dynamic: bool = False):
    template = chat_template(family)
    if family.startswith("internvl"):
        from transformers import GotOcr2ImageProcessorPil

        # tiles > 1: InternVL's own setting (crop_to_patches, up to max_patches crops + a thumbnail).
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": preset.image_size, "width": preset.image_size},
            crop_to_patches=tiles > 1, min_patches=1, max_patches=tiles,
        )
        tokens_per_image = (preset.image_size // preset.patch) ** 2 // 4  # pixel shuffle 0.5
        return InternVLProcessorNoVideo(
            image_processor=image_processor, tokenizer=tokenizer,
            image_seq_length=tokens_per_image, chat_template=template,
        )
    if family in DYNAMIC_FAMILIES:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        qwen3 = family in QWEN3_VL
        patch = QWEN3_PATCH if qwen3 else preset.patch
        pixels = preset.image_size * preset.image_size
        # dynamic: the token count follows the image's size between Qwen's bounds (four merged
        # 2x2 patches at least, four preset-size images' worth at most); else one fixed resolution.
        unit = (2 * patch) ** 2
        bounds = {"shortest_edge": unit * 4, "longest_edge": pixels * 4} if dynamic else {
            "shortest_edge": pixels, "longest_edge": pixels}
        # Qwen3-VL normalises with mean = std = 0.5 (its released preprocessor config); Qwen2.5-VL
        # with CLIP's statistics, the image processor's default.
        norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if qwen3 else {}
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch, merge_size=2, temporal_patch_size=2, size=bounds, **norm,
        )
        processor_class = Qwen3VLProcessorNoVideo if qwen3 else Qwen2_5_VLProcessorNoVideo
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    if family == "llava":
        from transformers import LlavaImageProcessorPil, LlavaProcessor

        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": preset.image_size},
            crop_size={"height": preset.image_size, "width": preset.image_size},
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=preset.patch,
            vision_feature_select_strategy="default", chat_template=template,
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        )
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _qwen_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen-VL configs' ids of their vision special tokens."""
    tokens = {"image": "<|image_pad|>", "video": "<|video_pad|>", "vision_start": "<|vision_start|>",
              "vision_end": "<|vision_end|>"}
    return {f"{key}_token_id": tokenizer.convert_tokens_to_ids(token) for key, token in tokens.items()}


def build_config(family: str, preset: Preset, tokenizer, tied: bool = False):
    """``tied``: the output embedding shares the input embedding's weights, as in many released
    checkpoints (the small Qwen2.5 language models, for one)."""
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab, hidden_size=preset.text_hidden, num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads, num_key_value_heads=preset.text_kv_heads,
        intermediate_size=preset.text_intermediate, max_position_embeddings=4096,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if family.startswith("internvl"):
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

        vision = InternVLVisionConfig(
            hidden_size=preset.vision_hidden, num_hidden_layers=preset.vision_layers,
            num_attention_heads=preset.vision_heads, intermediate_size=preset.vision_intermediate,
            patch_size=[preset.patch, preset.patch], image_size=[preset.image_size, preset.image_size],
            use_mask_token=False, use_absolute_position_embeddings=True,
        )
        head_dim = preset.text_hidden // preset.text_heads
        moe = dict(TINY_MOE, moe_intermediate_size=preset.text_intermediate // 8)
        text_config = {"internvl": lambda: Qwen2Config(**text),
                       "internvl3_5": lambda: Qwen3Config(**text, head_dim=head_dim),
                       "internvl3_5_moe": lambda: Qwen3MoeConfig(**text, **moe, head_dim=head_dim)}[family]()
        return InternVLConfig(
            vision_config=vision, text_config=text_config,
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=(preset.image_size // preset.patch) ** 2 // 4,
            downsample_ratio=0.5, tie_word_embeddings=tied,
        )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        head_dim = preset.text_hidden // preset.text_heads
        # Qwen2.5-VL's multimodal RoPE needs sum(mrope_section) == head_dim / 2.
        spatial = 3 * head_dim // 16  # Qwen's own split for head_dim 128 is [16, 24, 24]
        mrope = [head_dim // 2 - 2 * spatial, spatial, spatial]
        text_cfg = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": mrope})
        vision = dict(
            depth=preset.vision_layers, hidden_size=preset.vision_hidden,
            intermediate_size=preset.vision_intermediate, num_heads=preset.vision_heads,
            patch_size=preset.patch, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=preset.text_hidden, window_size=preset.patch * 4,
            fullatt_block_indexes=[preset.vision_layers - 1],
        )
        return Qwen2_5_VLConfig(
            text_config=text_cfg, vision_config=vision, tie_word_embeddings=tied, **_qwen_token_ids(tokenizer))
    if family in QWEN3_VL:
        from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

        head_dim = preset.text_hidden // preset.text_heads
        # Interleaved multimodal RoPE over head_dim / 2 frequencies, split t/h/w as Qwen3-VL's
        # released [24, 20, 20] for head_dim 128.
        spatial = 5 * head_dim // 32
        text_cfg = dict(text, head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
            "mrope_section": [head_dim // 2 - 2 * spatial, spatial, spatial]})
        if family == "qwen3_vl_moe":
            text_cfg |= dict(TINY_MOE, moe_intermediate_size=preset.text_intermediate // 8)
        grid = preset.image_size // QWEN3_PATCH
        vision = dict(
            depth=preset.vision_layers, hidden_size=preset.vision_hidden,
            intermediate_size=preset.vision_intermediate, num_heads=preset.vision_heads,
            patch_size=QWEN3_PATCH, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=preset.text_hidden, num_position_embeddings=grid * grid,
            # DeepStack: features of these vision layers feed the first LLM layers, one merger each
            # (the 8B checkpoint taps layers 8, 16 and 24 of 27).
            deepstack_visual_indexes=list(range(min(preset.vision_layers, preset.text_layers))),
        )
        config_class = Qwen3VLMoeConfig if family == "qwen3_vl_moe" else Qwen3VLConfig
        return config_class(
            text_config=text_cfg, vision_config=vision, tie_word_embeddings=tied, **_qwen_token_ids(tokenizer))
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=preset.vision_hidden, num_hidden_layers=preset.vision_layers,
            num_attention_heads=preset.vision_heads, intermediate_size=preset.vision_intermediate,
            patch_size=preset.patch, image_size=preset.image_size, projection_dim=preset.vision_hidden,
        )
        return LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**text),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(preset.image_size // preset.patch) ** 2,
            vision_feature_select_strategy="default", vision_feature_layer=-1,
            tie_word_embeddings=tied,
        )
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def build_tiny(family: str, out: str | Path, size: str = "tiny", seed: int = 0,
               corpus: Sequence[str] | None = None, tied: bool = False, tiles: int | None = None,
               dynamic: bool | None = None, vocab: int | None = None) -> Path:
    """Build a random ``family`` model of preset ``size`` and save model + processor to ``out``.

    ``tied`` shares the input and output embeddings; ``tiles`` > 1 turns on InternVL's tiling
    (InternVL3.5 presets: 12, as released); ``dynamic`` gives Qwen2.5-VL dynamic resolution
    (Qwen3-VL presets: always on, as released); ``vocab`` sets the tokenizer's size."""
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    preset = PRESETS[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (tiles or 1) > 1 and not family.startswith("internvl") or dynamic and family not in DYNAMIC_FAMILIES:
        raise ValueError("tiles is InternVL's setting and dynamic Qwen-VL's")
    tiles = DEFAULT_TILES.get(family, 1) if tiles is None else tiles
    dynamic = family in QWEN3_VL if dynamic is None else dynamic
    tokenizer = build_tokenizer(family, corpus or _fallback_corpus(), vocab or preset.vocab_size)
    processor = build_processor(family, tokenizer, preset, tiles, dynamic)
    config = build_config(family, preset, tokenizer, tied)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    write_released_layout(out)  # Qwen3-VL-MoE: fused experts as the released checkpoints store them
    save_processor(processor, out)  # with the video-processor file vLLM's environment needs
    if family == "llava":
        _nest_clip_tower(out / "model.safetensors")
    n_params = sum(p.numel() for p in model.parameters())
    (out / "r1v3_tiny.json").write_text(json.dumps(
        {"family": family, "size": size, "seed": seed, "tied": tied, "tiles": tiles, "dynamic": dynamic,
         "vocab": len(tokenizer), "params": n_params, "image_size": preset.image_size}, indent=1))
    return out




def _nest_clip_tower(path: Path) -> None:
    """Save LLaVA's CLIP tower as ``vision_tower.vision_model.*``, the layout of real LLaVA
    checkpoints that vLLM expects; transformers reads both (it saves the flat one since 5.19)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def tiny_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1v3 tiny", description=(
        "Build a random tiny VLM (model + BPE tokenizer + processor) offline and save it."))
    parser.add_argument("--family", choices=FAMILIES, default="internvl")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tied", action="store_true", help="share the input and output embeddings")
    parser.add_argument("--tiles", type=int, default=None, help=(
        "InternVL: tile images into up to this many crops plus a thumbnail (default: 12 for InternVL3.5 "
        "as released, else 1)"))
    parser.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=None, help=(
        "Qwen-VL: dynamic resolution, the token count follows the image size (default: on for Qwen3-VL "
        "as released, else off)"))
    parser.add_argument("--vocab", type=int, default=None, help="tokenizer size, e.g. 151000 as in Qwen2.5")
    args = parser.parse_args(argv)
    if (args.tiles or 1) > 1 and not args.family.startswith("internvl") or (
            args.dynamic and args.family not in DYNAMIC_FAMILIES):
        parser.error("--tiles is for the InternVL families and --dynamic for the Qwen-VL ones")
    out = build_tiny(args.family, args.out, size=args.size, seed=args.seed, tied=args.tied, tiles=args.tiles,
                     dynamic=args.dynamic, vocab=args.vocab)
    print(json.dumps(json.loads((out / "r1v3_tiny.json").read_text()) | {"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(tiny_main())
