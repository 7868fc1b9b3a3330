"""``r1v3 shapes``: a model's parameters per module group and its FSDP units, counted on the meta
device (no weights, no memory), for the published shapes of released checkpoints or any local
checkpoint's ``config.json``.

The shapes below are transcribed from each model's released ``config.json``; ``card_total`` is the
parameter total its model card (or hub page) states, which the counts must come within 3% of
(``tests/test_shapes.py``). Sources and the values are listed in docs/models.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

_QWEN3_VL_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                        deepstack_visual_indexes=[8, 16, 24], in_channels=3, hidden_act="gelu_pytorch_tanh")
_QWEN3_VL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                        vision_end_token_id=151653, tie_word_embeddings=False)
_MROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}

# name -> (config class, its arguments, the model card's total, where that total is stated)
PUBLISHED = {
    "qwen3_vl_8b": ("Qwen3VLConfig", dict(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_parameters=_MROPE),
        vision_config=dict(_QWEN3_VL_VISION, out_hidden_size=4096), **_QWEN3_VL_TOKENS),
        8.77e9, "Qwen/Qwen3-VL-8B-Instruct: 8.77B (hub model size)"),
    "qwen3_vl_30b_a3b": ("Qwen3VLMoeConfig", dict(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                         num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                         mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False, rope_parameters=_MROPE),
        vision_config=dict(_QWEN3_VL_VISION, out_hidden_size=2048), **_QWEN3_VL_TOKENS),
        31.07e9, "Qwen/Qwen3-VL-30B-A3B-Instruct: 31.07B (hub model size)"),
    "internvl3_5_8b": ("InternVLConfig", dict(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=[14, 14], image_size=[448, 448], hidden_act="gelu", attention_bias=True,
                           use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
                           layer_scale_init_value=0.1, use_absolute_position_embeddings=True, use_mask_token=False,
                           use_mean_pooling=True),
        text_config=dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                         num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=False),
        downsample_ratio=0.5, projector_hidden_act="gelu", image_token_id=151671, image_seq_length=256,
        # The outer flag decides tying in transformers 5 and defaults to True; InternVL3.5 does not tie.
        tie_word_embeddings=False),
        8.5e9, "OpenGVLab/InternVL3_5-8B-HF model card: 0.3B vision + 8.2B language = 8.5B"),
    # The paper's base model: InternViT-6B-448px-V2.5, an MLP projector, Qwen2.5-32B.
    "internvl3_38b": ("InternVLConfig", dict(
        vision_config=dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
                           patch_size=[14, 14], image_size=[448, 448], hidden_act="gelu", attention_bias=False,
                           use_qk_norm=True, norm_type="rms_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1,
                           use_absolute_position_embeddings=True, use_mask_token=False, use_mean_pooling=True),
        text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=5120, intermediate_size=27648,
                         num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                         tie_word_embeddings=False),
        downsample_ratio=0.5, projector_hidden_act="gelu", image_token_id=151667, image_seq_length=256,
        tie_word_embeddings=False),
        38.4e9, "OpenGVLab/InternVL3-38B: 38.4B (hub model size)"),
}


def published_config(name: str):
    import transformers

    class_name, kwargs, _, _ = PUBLISHED[name]
    return getattr(transformers, class_name)(**kwargs)


def load_config(model: str):
    """A published shape by name, or the config of a local checkpoint directory."""
    if model in PUBLISHED:
        return published_config(model)
    from transformers import AutoConfig

    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"r1v3 shapes: error: {model!r} is neither a published shape ({', '.join(PUBLISHED)}) "
                         "nor a directory with a config.json")
    return AutoConfig.from_pretrained(model)


def count(config, groups: dict[str, list[str]] | None = None) -> dict:
    """Parameters per module group and the FSDP units of ``config``'s model, built on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    from r1v3.backbone import detect_family, group_of, resolve_groups, split_parameters
    from r1v3.fsdp import sharding_units

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    family = detect_family(config)
    named_groups = resolve_groups(family, groups)
    per_group = {g: sum(p.numel() for _, p in params) for g, params in split_parameters(model, named_groups).items()}
    units, claimed = Counter(), set()
    largest = {}
    for name, unit in reversed(sharding_units(model)):  # inner units first, as fully_shard claims them
        own = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        kind = type(unit).__name__
        units[kind] += 1
        largest[kind] = max(largest.get(kind, 0), sum(p.numel() for p in own))
    root = sum(p.numel() for p in model.parameters() if id(p) not in claimed)
    # For LoRA plans: per group and layer name, the summed in + out widths of the linear layers
    # (an adapter of rank r on a layer has r × (in + out) parameters); the output head is left out,
    # as r1v3's default targets leave it.
    head = model.get_output_embeddings()
    widths: dict[str, Counter] = {g: Counter() for g in per_group}
    for name, module in model.named_modules():
        group = group_of(name + ".weight", named_groups)
        if isinstance(module, torch.nn.Linear) and module is not head and group in widths:
            widths[group][name.rsplit(".", 1)[-1]] += module.in_features + module.out_features
    return {"family": family, "total": sum(per_group.values()), "groups": per_group,
            "linear_widths": {g: dict(c) for g, c in widths.items()},
            "fsdp_units": {kind: {"count": units[kind], "largest": largest[kind]} for kind in units},
            "fsdp_root": root}


def shapes_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1v3 shapes", description=(
        "Count a model's parameters per module group (vision, connector, llm) and list its FSDP units, on the "
        "meta device: published shapes by name, or a local checkpoint's config.json."))
    parser.add_argument("models", nargs="*", default=list(PUBLISHED),
                        help=f"published shapes ({', '.join(PUBLISHED)}) or checkpoint directories (default: all published)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    args = parser.parse_args(argv)
    for model in args.models:
        result = {"model": model} | count(load_config(model))
        if model in PUBLISHED:
            card = PUBLISHED[model][2]
            result |= {"card_total": card, "vs_card": round(result["total"] / card, 4), "card": PUBLISHED[model][3]}
        if args.json:
            print(json.dumps(result))
            continue
        print(f"{model} ({result['family']}): {result['total'] / 1e9:.3f}B parameters"
              + (f", {result['vs_card']:.1%} of the card's {result['card_total'] / 1e9:g}B" if "card" in result else ""))
        for group, n in result["groups"].items():
            print(f"  {group:<10} {n:>15,}")
        for kind, unit in result["fsdp_units"].items():
            print(f"  FSDP unit {kind:<34} x{unit['count']:<4} largest {unit['largest']:>13,}")
        print(f"  FSDP root (embeddings, head, norms, rest)       {result['fsdp_root']:>13,}")
    return 0


if __name__ == "__main__":
    sys.exit(shapes_main())
