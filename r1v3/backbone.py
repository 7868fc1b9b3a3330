"""Load a VLM + processor, name its module groups, and apply a freeze plan.

Every stage owns one :class:`Backbone`.  Module groups are parameter-name prefixes, matched
longest-first, so a group nested inside another (Qwen2.5-VL's merger inside its vision tower) wins
over its parent.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from r1v3.distributed import clean_name
from r1v3.encoding import multimodal_tokens
from r1v3.errors import BackboneError
from r1v3.processors import check_model_path, load_processor

log = logging.getLogger(__name__)

GROUP_NAMES = ("vision", "connector", "llm")

# Parameter-name prefixes per family, for transformers' own model classes
# (AutoModelForImageTextToText). Connector paths: docs/design.md §2.
FAMILY_GROUPS: dict[str, dict[str, list[str]]] = {
    "internvl": {
        "vision": ["model.vision_tower."],
        "connector": ["model.multi_modal_projector."],
        "llm": ["model.language_model.", "lm_head."],
    },
    "qwen2_5_vl": {
        "vision": ["model.visual."],
        "connector": ["model.visual.merger."],
        "llm": ["model.language_model.", "lm_head."],
    },
    "llava": {
        "vision": ["model.vision_tower."],
        "connector": ["model.multi_modal_projector."],
        "llm": ["model.language_model.", "lm_head."],
    },
}
FAMILY_GROUPS["qwen2_vl"] = FAMILY_GROUPS["qwen2_5_vl"]
# Qwen3-VL's DeepStack mergers take features from inner vision layers into the first LLM layers'
# hidden states: each is a projector from vision space to the language model's, like the final
# merger, so connector-only tuning trains them too (docs/models.md).
FAMILY_GROUPS["qwen3_vl"] = FAMILY_GROUPS["qwen3_vl_moe"] = {
    "vision": ["model.visual."],
    "connector": ["model.visual.merger.", "model.visual.deepstack_merger_list."],
    "llm": ["model.language_model.", "lm_head."],
}
QWEN_VL_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe")

# Families transformers has that r1v3 refuses up front, with why (docs/models.md).
_HYBRID = ("its hybrid layers keep a linear-attention state, not the per-token key/value cache that "
           "r1v3's shared prompt pass repeats per completion; see docs/models.md")
UNSUPPORTED = {"qwen3_5": _HYBRID, "qwen3_5_moe": _HYBRID}

TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadConfig:
    """How a stage loads its backbone; the same settings for every stage.

    Args:
        dtype: Dtype the weights load in (``float32``, ``bfloat16``); autocast is the trainer's
            ``precision``.
        attn_implementation: ``sdpa`` (default), ``eager``, or ``flash_attention_2`` (CUDA +
            flash-attn only).
        trust_remote_code: Allow the checkpoint's own Python code (off unless you ask).
        groups: Module groups as parameter-name prefixes, for families r1v3 does not know.
        gradient_checkpointing: Recompute activations in the backward pass to save memory
            (training stages).
        router_aux_loss_coef: Mixture-of-experts models: weight of the router's load-balancing
            loss, added to every stage's training loss and logged as ``train/router_aux_loss``.
            ``None`` keeps the checkpoint's setting (its ``router_aux_loss_coef`` if its
            ``output_router_logits`` is on, else off); 0 turns it off.
        padding_free: Run training forwards padding-free: a micro-batch's rows as one packed
            sequence of their real tokens (SDPA or flash-attn 2 models; docs/performance.md,
            "Padding-free update"). Results equal the padded batch's to rounding.
        compile: ``torch.compile`` the language model's decoder layers for the padding-free
            training forwards (needs ``padding_free``): one graph per grad mode whatever the
            lengths. Off by default: on this project's 2-core CPU it measured no faster
            (docs/performance.md, "Compiled layers"); the kernels it generates on GPU differ.
    """

    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    groups: Mapping[str, list[str]] | None = None
    gradient_checkpointing: bool = False
    router_aux_loss_coef: float | None = None
    padding_free: bool = True
    compile: bool = False


# Lightning checkpoints keep the stage's hyperparameters; allow-listing this plain config class lets
# them load with torch.load(weights_only=True), the default since torch 2.6.
torch.serialization.add_safe_globals([LoadConfig])


@dataclass
class Backbone:
    model: torch.nn.Module
    processor: object
    family: str
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def group_of(self, name: str) -> str | None:
        return group_of(name, self.groups)

    def group_parameters(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        return split_parameters(self.model, self.groups)

    def module(self, group: str) -> torch.nn.Module:
        """The single module a group's first prefix names (e.g. the connector)."""
        prefix = self.groups[group][0].rstrip(".")
        return self.model.get_submodule(prefix)


def detect_family(config) -> str:
    return getattr(config, "model_type", "unknown")


def group_of(name: str, groups: Mapping[str, Sequence[str]]) -> str | None:
    best, best_len = None, -1
    for group, prefixes in groups.items():
        for prefix in prefixes:
            if name.startswith(prefix) and len(prefix) > best_len:
                best, best_len = group, len(prefix)
    return best


def split_parameters(model: torch.nn.Module, groups: Mapping[str, Sequence[str]]):
    out: dict[str, list] = {g: [] for g in groups}
    unmatched = []
    for name, param in model.named_parameters():
        group = group_of(clean_name(name), groups)
        if group is None:
            unmatched.append(name)
        else:
            out[group].append((name, param))
    if unmatched:
        raise BackboneError(
            f"{len(unmatched)} parameters belong to no module group (first: {unmatched[0]!r}). "
            "Declare the groups in the config, e.g. `--model.init_args.groups "
            "'{vision: [model.vision_tower.], connector: [model.multi_modal_projector.], "
            "llm: [model.language_model., lm_head.]}'`.")
    return out


def resolve_groups(family: str, groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    if groups:
        missing = [g for g in GROUP_NAMES if g not in groups]
        if missing:
            raise BackboneError(f"`groups` must declare {list(GROUP_NAMES)}; missing {missing}")
        return {g: list(p) for g, p in groups.items()}
    if family not in FAMILY_GROUPS:
        raise BackboneError(
            f"Unknown model family {family!r}: r1v3 knows {sorted(FAMILY_GROUPS)}. Declare its module "
            "groups as parameter-name prefixes in the config, e.g.\n  model:\n    init_args:\n"
            "      groups:\n        vision: [model.vision_tower.]\n        connector: "
            "[model.multi_modal_projector.]\n        llm: [model.language_model., lm_head.]")
    return {g: list(p) for g, p in FAMILY_GROUPS[family].items()}


def apply_freeze_plan(backbone: Backbone, trainable: Iterable[str]) -> dict[str, dict[str, int]]:
    """Make exactly the parameters of the ``trainable`` groups require grad. Returns and logs the
    per-group trainable/total counts."""
    trainable = list(trainable)
    unknown = [g for g in trainable if g not in backbone.groups]
    if unknown:
        raise BackboneError(f"freeze plan names unknown groups {unknown}; known: {list(backbone.groups)}")
    counts = {}
    for group, params in backbone.group_parameters().items():
        train = group in trainable
        for _, p in params:
            p.requires_grad_(train)
        total = sum(p.numel() for _, p in params)
        counts[group] = {"trainable": total if train else 0, "total": total}
    for group, c in counts.items():
        log.debug("group %-9s trainable %12s / %12s", group, f"{c['trainable']:,}", f"{c['total']:,}")
    return counts


def resolve_attn_implementation(requested: str | None, device: str | torch.device = "cpu") -> str:
    requested = requested or "sdpa"
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise BackboneError("attn_implementation=flash_attention_2 needs the flash-attn package "
                                "(pip install 'r1v3[gpu]'); use 'sdpa' otherwise.")
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise BackboneError("attn_implementation=flash_attention_2 runs only on CUDA; this run is "
                                f"on {torch.device(device).type}. Use 'sdpa'.")
    return requested


def load_backbone(path: str | Path, dtype: str = "float32", attn_implementation: str | None = "sdpa",
                  trust_remote_code: bool = False, groups: Mapping[str, Sequence[str]] | None = None,
                  device: str = "cpu", on_meta: bool = False) -> Backbone:
    """Load model + processor from a local directory (or hub id) the way any checkpoint loads.
    ``on_meta``: build the parameters on the meta device instead, for a sharded load
    (:mod:`r1v3.sharded_load`; falls back to the full load where the checkpoint does not allow it)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if dtype not in TORCH_DTYPES:
        raise BackboneError(f"dtype {dtype!r} not understood; use one of {sorted(TORCH_DTYPES)}")
    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise BackboneError(f"cannot read a model config from {path}: {str(err).splitlines()[0]}") from None
    family = detect_family(config)
    if family in UNSUPPORTED:
        raise BackboneError(f"{path}: {family} is not supported: {UNSUPPORTED[family]}")
    resolved_groups = resolve_groups(family, groups)
    attn = resolve_attn_implementation(attn_implementation, device)
    model = None
    if on_meta and not trust_remote_code and Path(path).is_dir():
        from r1v3.sharded_load import build_on_meta

        model = build_on_meta(path, config, TORCH_DTYPES[dtype], attn)
    if model is None:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=TORCH_DTYPES[dtype], attn_implementation=attn,
            trust_remote_code=trust_remote_code, use_safetensors=None,
        )
    processor = load_processor(path, trust_remote_code)
    backbone = Backbone(model=model, processor=processor, family=family, groups=resolved_groups)
    split_parameters(model, resolved_groups)  # fail early on unmatched parameters
    return backbone


def image_features(config, images: Mapping[str, torch.Tensor]) -> int | None:
    """How many feature vectors the vision side of a ``config`` model makes of one prompt's image
    tensors: the number of image tokens its prompt must hold. None for a family r1v3 cannot count."""
    family, vision = detect_family(config), getattr(config, "vision_config", None)
    pixels, grid = images.get("pixel_values"), images.get("image_grid_thw")
    if family == "internvl" and pixels is not None:
        side, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (vision.image_size, vision.patch_size))
        return int(pixels.shape[0] * round((side // patch) ** 2 * config.downsample_ratio ** 2))
    if family in QWEN_VL_FAMILIES and grid is not None:
        return int(grid.prod(-1).sum()) // vision.spatial_merge_size ** 2
    if family == "llava" and pixels is not None:
        cls = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
        return int(pixels.shape[0] * ((vision.image_size // vision.patch_size) ** 2 + cls))
    return None


def image_token_check(config):
    """A check of one encoded prompt: ``check(input_ids, images)`` → (image tokens, image features),
    or None when this family cannot be counted. The two differ when the processor and the model
    disagree (a processor config's ``image_seq_length``, patch size or merge size that is not the
    model's), which transformers reports only deep in a forward pass."""
    token = getattr(config, "image_token_id", None)
    if token is None or detect_family(config) not in ("internvl", "llava", *QWEN_VL_FAMILIES):
        return None

    def check(input_ids: torch.Tensor, images: Mapping[str, torch.Tensor]) -> tuple[int, int | None]:
        return int((input_ids == token).sum()), image_features(config, images) if images else 0
    return check


def multimodal_token_ids(processor) -> list[int]:
    """Ids of image/video placeholder tokens. Generation must never emit them: a completion holding
    one would no longer match its images when fed back for the loss."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = {tokenizer.convert_tokens_to_ids(token) for token in multimodal_tokens(processor)}
    return sorted(int(i) for i in ids if i is not None and i != tokenizer.unk_token_id)
