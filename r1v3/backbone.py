"""Load a VLM + processor, name its module groups, and apply a freeze plan.

Every stage owns one :class:`Backbone`.  Module groups are parameter-name prefixes, matched
longest-first, so a group nested inside another (Qwen2.5-VL's merger inside its vision tower) wins
over its parent.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from transformers import InternVLProcessor, Qwen2_5_VLProcessor

from r1v3.encoding import multimodal_tokens
from r1v3.errors import UserError

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
    """

    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    groups: Mapping[str, list[str]] | None = None
    gradient_checkpointing: bool = False


# Lightning checkpoints keep the stage's hyperparameters; allow-listing this plain config class lets
# them load with torch.load(weights_only=True), the default since torch 2.6.
torch.serialization.add_safe_globals([LoadConfig])


class BackboneError(UserError):
    """A model or freeze-plan setting the user can fix; its message says how."""


class InternVLProcessorNoVideo(InternVLProcessor):
    """InternVL's processor without its video processor, which needs torchvision (absent on CPU-torch
    installs). Saved under the parent's name so real transformers installs load it as usual."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                 chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)

    def to_dict(self):
        return super().to_dict() | {"processor_class": "InternVLProcessor"}


class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor (see InternVLProcessorNoVideo)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self):
        return super().to_dict() | {"processor_class": "Qwen2_5_VLProcessor"}


_NO_VIDEO = {"InternVLProcessor": InternVLProcessorNoVideo,
             "Qwen2_5_VLProcessor": Qwen2_5_VLProcessorNoVideo}


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
        group = group_of(_clean_name(name), groups)
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


def _clean_name(name: str) -> str:
    # FSDP/activation-checkpoint wrappers insert these path components.
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


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


def check_model_path(path: str | Path) -> None:
    """A path that looks local must exist; anything else is taken as a hub id."""
    local = Path(path)
    if not local.exists() and (str(path).startswith((".", "/", "~")) or local.suffix or len(local.parts) > 2):
        raise BackboneError(f"model directory {path} does not exist (build one with `r1v3 tiny --out {path}`)")


# Processors that insist on a video half, and the video processor type a minimal
# video_preprocessor_config.json names: where torchvision exists (vLLM's environment) the processor
# loads from that file alone, and writing it needs no torchvision.
VIDEO_PROCESSOR = {"InternVLProcessor": "InternVLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor"}
VIDEO_FILE = "video_preprocessor_config.json"


def save_processor(processor, out: str | Path) -> None:
    """``save_pretrained``, plus the video-processor file a processor saved without torchvision
    lacks: an export from the core environment then loads in vLLM's (which has torchvision)."""
    out = Path(out)
    processor.save_pretrained(str(out))
    config = out / "processor_config.json"
    name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    if name in VIDEO_PROCESSOR and not (out / VIDEO_FILE).exists():
        (out / VIDEO_FILE).write_text(json.dumps({"video_processor_type": VIDEO_PROCESSOR[name]}))


def needs_video_file(path: str | Path) -> str | None:
    """The processor class of a checkpoint whose processor needs a video-processor file it lacks."""
    config = Path(path) / "processor_config.json"
    name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    return name if name in VIDEO_PROCESSOR and not (Path(path) / VIDEO_FILE).exists() else None


# The processor class of each family r1v3 knows, by the model config's model_type.
_FAMILY_PROCESSOR = {"internvl": "InternVLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                     "qwen2_vl": "Qwen2VLProcessor", "llava": "LlavaProcessor"}


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's processor, as transformers loads it; where that yields no image processor
    (a processor class transformers does not know, so ``AutoProcessor`` returns a bare tokenizer),
    the model config's ``model_type`` picks the family's processor instead, with one warning."""
    from transformers import AutoProcessor

    check_model_path(path)
    config_file = Path(path) / "processor_config.json"
    no_torchvision = importlib.util.find_spec("torchvision") is None
    if config_file.is_file() and no_torchvision:
        name = json.loads(config_file.read_text()).get("processor_class")
        if name in _NO_VIDEO:
            return _NO_VIDEO[name].from_pretrained(str(path))
    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except OSError as err:  # e.g. "Can't load video processor": the file is optional for training
        name = needs_video_file(path)
        if name not in _NO_VIDEO:
            raise
        log.warning("[r1v3] %s: no %s (%s); loading %s without its video half", path, VIDEO_FILE,
                    str(err).splitlines()[0][:80], name)
        return _NO_VIDEO[name].from_pretrained(str(path))
    if hasattr(processor, "image_processor"):
        return processor
    model_file = Path(path) / "config.json"
    model_type = json.loads(model_file.read_text()).get("model_type") if model_file.is_file() else None
    name = _FAMILY_PROCESSOR.get(model_type)
    if name is None:
        return processor  # the stage refuses it if the data has images (r1v3.encoding)
    import transformers

    family_class = _NO_VIDEO[name] if no_torchvision and name in _NO_VIDEO else getattr(transformers, name)
    log.warning("[r1v3] %s: AutoProcessor gave a %s without an image processor; loading %s for model_type %r",
                path, type(processor).__name__, family_class.__name__, model_type)
    return family_class.from_pretrained(str(path))


def load_backbone(path: str | Path, dtype: str = "float32", attn_implementation: str | None = "sdpa",
                  trust_remote_code: bool = False, groups: Mapping[str, Sequence[str]] | None = None,
                  device: str = "cpu") -> Backbone:
    """Load model + processor from a local directory (or hub id) the way any checkpoint loads."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if dtype not in TORCH_DTYPES:
        raise BackboneError(f"dtype {dtype!r} not understood; use one of {sorted(TORCH_DTYPES)}")
    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise BackboneError(f"cannot read a model config from {path}: {str(err).splitlines()[0]}") from None
    family = detect_family(config)
    resolved_groups = resolve_groups(family, groups)
    if device == "cpu" and not torch.cuda.is_available():
        # transformers' own switch: grouped-query attention goes to SDPA with enable_gqa instead of
        # first copying each KV head to every query head (repeat_kv). It only enables it on CUDA
        # without a mask, where a mask would fall back to the math kernel; CPU's flash kernel takes
        # the mask, and a GRPO update measured 4% (fp32) to 8% (bf16) faster (bench/update_flops.py).
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=TORCH_DTYPES[dtype], attn_implementation=resolve_attn_implementation(
            attn_implementation, device),
        trust_remote_code=trust_remote_code, use_safetensors=None,
    )
    processor = load_processor(path, trust_remote_code)
    backbone = Backbone(model=model, processor=processor, family=family, groups=resolved_groups)
    split_parameters(model, resolved_groups)  # fail early on unmatched parameters
    return backbone


def multimodal_token_ids(processor) -> list[int]:
    """Ids of image/video placeholder tokens. Generation must never emit them: a completion holding
    one would no longer match its images when fed back for the loss."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = {tokenizer.convert_tokens_to_ids(token) for token in multimodal_tokens(processor)}
    return sorted(int(i) for i in ids if i is not None and i != tokenizer.unk_token_id)
