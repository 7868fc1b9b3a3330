"""Prompt encoding through the model's processor: the bottom layer that the data modules, the
rollout engines, the log-prob passes and FSDP's blank-image pass all share.

A rollout step needs the same prompts many times: the engine's prefill, the token budget of each
micro-batch, every log-prob pass (policy, old policy, reference) and the monitors. Images are the
costly part of an encoding, so :class:`PromptEncoder.encode_each` encodes each prompt once, alone,
and :class:`EncodedPrompts` builds any batch of them (a subset, a prompt repeated per row) by
padding and concatenating tensors, without calling the processor again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from r1v3.errors import UserError

IGNORE_INDEX = -100
# Processor outputs laid out per text token; everything else is image data.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class PromptTooLongError(UserError):
    pass


def family_of(processor) -> str:
    """A guess from the processor's class name, for a processor met without its model; the stages
    use the model config's ``model_type`` instead (``PromptEncoder.family``)."""
    name = type(processor).__name__.lower()
    for family in ("internvl", "qwen3_vl", "qwen2_5_vl", "qwen2vl", "llava"):
        if family.replace("_", "") in name.replace("_", ""):
            return family
    return "other"


def image_kwargs(family: str, min_pixels: int | None, max_pixels: int | None,
                 max_tiles: int | None, image_processor: Any = None) -> dict:
    """Per-family resolution controls, passed to every processor call, and to a rollout engine that
    runs its own processor: stated in full, so both sides encode an image the same way by
    construction. Unset, a setting is the checkpoint's own (its image processor's), as
    transformers would use it."""
    if family == "internvl":
        if max_tiles is None:  # the checkpoint's tiling: InternVL3 tiles into up to 12 crops + a thumbnail
            crop = bool(getattr(image_processor, "crop_to_patches", False))
            max_tiles = int(getattr(image_processor, "max_patches", 1) or 1) if crop else 1
        if max_tiles > 1:
            return {"crop_to_patches": True, "max_patches": max_tiles}
        return {"crop_to_patches": False}
    if family in ("qwen2_5_vl", "qwen2_vl", "qwen2vl", "qwen3_vl", "qwen3_vl_moe"):  # dynamic resolution between two pixel bounds
        size = dict(getattr(image_processor, "size", None) or {})
        if min_pixels:
            size["shortest_edge"] = min_pixels
        if max_pixels:
            size["longest_edge"] = max_pixels
        return {"size": size} if size else {}
    return {}


_MM_TOKEN_ATTRS = ("image_token", "video_token", "start_image_token", "end_image_token",
                   "context_image_token", "vision_start_token", "vision_end_token", "boi_token", "eoi_token")
QUESTION_IMAGE_MARK = "<image>"  # how a question marks where an image goes (r1v3.chat)


def multimodal_tokens(processor) -> set[str]:
    """The processor's image/video special tokens as text (``<IMG_CONTEXT>``, ``<|image_pad|>``, …)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return {token for attr in _MM_TOKEN_ATTRS for owner in (processor, tokenizer)
            for token in [getattr(owner, attr, None)] if isinstance(token, str)}


def split_encoding(enc: dict) -> tuple[dict, dict]:
    """A processor output → (token tensors, image tensors)."""
    return ({k: v for k, v in enc.items() if k in TOKEN_KEYS},
            {k: v for k, v in enc.items() if k not in TOKEN_KEYS})


@dataclass
class EncodedPrompts:
    """Prompts encoded one by one: ``tokens[i]`` holds 1-D token tensors and ``images[i]`` the
    image tensors of prompt i (empty without images). :meth:`batch` lays any of them out as the
    processor would have for that batch: tokens left-padded, image tensors concatenated in order
    (every supported family stacks images or their patches along dim 0)."""

    tokens: list[dict[str, torch.Tensor]]
    images: list[dict[str, torch.Tensor]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.tokens)

    def length(self, i: int) -> int:
        """Prompt i's token count, image tokens included."""
        return int(self.tokens[i]["input_ids"].shape[-1])

    def select(self, indices: Sequence[int]) -> "EncodedPrompts":
        return EncodedPrompts([self.tokens[i] for i in indices], [self.images[i] for i in indices], self.pad_id)

    def batch(self, indices: Sequence[int] | None = None) -> tuple[dict, dict]:
        """(token tensors [B, L], image tensors) for prompts ``indices`` (default: all), repeats allowed."""
        indices = range(len(self)) if indices is None else list(indices)
        width = max(self.length(i) for i in indices)
        tokens = {}
        for key in self.tokens[indices[0]]:
            fill = self.pad_id if key == "input_ids" else 0
            rows = [self.tokens[i][key] for i in indices]
            out = torch.full((len(rows), width), fill, dtype=rows[0].dtype)
            for r, row in enumerate(rows):
                out[r, width - len(row):] = row
            tokens[key] = out
        images: dict[str, list] = {}
        for i in indices:
            for key, value in self.images[i].items():
                images.setdefault(key, []).append(value)
        return tokens, {k: torch.cat(v) for k, v in images.items()}


@dataclass
class PromptEncoder:
    """The processor plus the image settings every call must get (resolution, tiling)."""

    processor: Any
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_tiles: int | None = None
    family: str | None = None  # the model config's model_type; guessed from the processor if unset
    _image_kwargs: dict = field(init=False, repr=False)
    _special_image_tokens: list = field(init=False, repr=False)

    def __post_init__(self):
        self.family = self.family or family_of(self.processor)
        self._image_kwargs = image_kwargs(self.family, self.min_pixels, self.max_pixels, self.max_tiles,
                                          getattr(self.processor, "image_processor", None))
        self._special_image_tokens = sorted(multimodal_tokens(self.processor) - {QUESTION_IMAGE_MARK})

    def check_question(self, sample: dict) -> None:
        """A question must not hold the model's image special tokens as text: the processor would
        expand the real images beside them, and the model would find more image tokens than image
        features (the mismatch crash the established frameworks report most), deep in a forward."""
        question = sample.get("question") or ""
        found = [t for t in self._special_image_tokens if t in question]
        if found:
            raise UserError(f"sample {sample.get('id')!r}: its question holds the model's image token(s) {found} as "
                            f"text, which would not match its {len(sample.get('images') or [])} image(s); mark "
                            f"images with {QUESTION_IMAGE_MARK} only")

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_kwargs(self) -> dict:
        """The image settings of every processor call, for an engine that runs the processor
        itself (vLLM's ``mm_processor_kwargs``): both sides then encode an image the same way."""
        return dict(self._image_kwargs)

    def encode(self, texts: list[str], images: list[list]) -> dict:
        """One processor call over a batch: left-padded tokens and its images' tensors. A processor
        that cannot encode the images is refused: a tokenizer would drop them without a word, and
        the run would train on the placeholders' text alone."""
        kwargs = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
        has_images = any(images)
        if has_images:
            if not hasattr(self.processor, "image_processor"):
                raise UserError(f"the data has images but the model's processor is a {type(self.processor).__name__} "
                                "with no image processor, so the images would be dropped: give the checkpoint a "
                                "processor_config.json naming a processor class transformers knows")
            kwargs["images"] = images
            kwargs.update(self._image_kwargs)
        out = dict(self.processor(**kwargs))
        if has_images and not any(k not in TOKEN_KEYS for k in out):
            raise UserError(f"{type(self.processor).__name__} returned no image tensors for images it was given")
        return out

    def encode_prompts(self, texts: list[str], images: list[list]) -> tuple[dict, dict]:
        """Rendered prompt texts + their images → (token tensors, image tensors), left-padded."""
        return split_encoding(self.encode(texts, images))

    def encode_each(self, texts: Sequence[str], images: Sequence[list]) -> EncodedPrompts:
        """Each prompt encoded alone, its images processed exactly once."""
        tokens, image_tensors = [], []
        for text, imgs in zip(texts, images):
            tok, img = split_encoding(self.encode([text], [list(imgs)] if imgs else [[]]))
            tokens.append({k: v[0] for k, v in tok.items()})
            image_tensors.append(img)
        return EncodedPrompts(tokens, image_tensors, self.tokenizer.pad_token_id)


def append_targets(prompt: dict, target_ids: Sequence[Sequence[int]], pad_id: int):
    """Concatenate each unpadded (left-padded) prompt row with its target ids, then right-pad.

    Returns (inputs, labels, target_start): labels are -100 outside the targets; target_start[i]
    is the index of row i's first target token.
    """
    mask = prompt["attention_mask"].bool()
    dtype = prompt["input_ids"].dtype
    rows = {k: [] for k in prompt}
    labels, starts = [], []
    for i, tgt in enumerate(target_ids):
        tgt = torch.as_tensor(list(tgt), dtype=dtype)
        for key, value in prompt.items():
            fill = tgt if key == "input_ids" else (
                torch.ones_like(tgt) if key == "attention_mask" else torch.zeros_like(tgt))
            rows[key].append(torch.cat([value[i][mask[i]], fill.to(value.dtype)]))
        starts.append(int(mask[i].sum()))
        labels.append(torch.cat([torch.full((starts[-1],), IGNORE_INDEX, dtype=dtype), tgt]))
    width = max(len(r) for r in labels)

    def pad(seqs, value):
        out = torch.full((len(seqs), width), value, dtype=seqs[0].dtype)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = s
        return out

    inputs = {k: pad(v, pad_id if k == "input_ids" else 0) for k, v in rows.items()}
    return inputs, pad(labels, IGNORE_INDEX), torch.tensor(starts)
