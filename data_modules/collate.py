"""Pad and collate decoded samples through the model's processor.

A batch holds the prompt (left-padded, ready for ``generate``) and, for SFT, the full
prompt + target sequence (right-padded) with labels that mask everything but the assistant's
tokens. Image tensors are shared by both. Over-long prompts are never truncated: they raise or
are skipped and counted, as configured.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from r1v3 import chat

IGNORE_INDEX = -100
# Processor outputs laid out per text token; everything else is image data.
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class PromptTooLongError(ValueError):
    pass


def family_of(processor) -> str:
    name = type(processor).__name__.lower()
    for family in ("internvl", "qwen2_5_vl", "qwen2vl", "llava"):
        if family.replace("_", "") in name.replace("_", ""):
            return family
    return "other"


def image_kwargs(family: str, min_pixels: int | None, max_pixels: int | None,
                 max_tiles: int | None) -> dict:
    """Per-family resolution controls, passed to every processor call."""
    if family == "internvl":
        # InternVL tiles small images into many crops unless told not to (DESIGN §2).
        if max_tiles and max_tiles > 1:
            return {"crop_to_patches": True, "max_patches": max_tiles}
        return {"crop_to_patches": False}
    if family in ("qwen2_5_vl", "qwen2vl") and (min_pixels or max_pixels):
        size = {}
        if min_pixels:
            size["shortest_edge"] = min_pixels
        if max_pixels:
            size["longest_edge"] = max_pixels
        return {"size": size}
    return {}


@dataclass
class VLMCollator:
    """Callable turning a list of decoded samples into model-ready tensors.

    mode ``"sft"`` adds the supervised sequence; ``"prompt"`` gives prompts only (generation, RL).
    """

    processor: Any
    mode: Literal["sft", "prompt"] = "sft"
    max_prompt_length: int = 1024
    on_overlong: Literal["error", "skip"] = "error"
    system_prompt: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_tiles: int | None = None
    shuffle_images: bool = False  # control runs: pair each question with another sample's images
    seed: int = 0
    _image_kwargs: dict = field(init=False, repr=False)

    def __post_init__(self):
        self._image_kwargs = image_kwargs(family_of(self.processor), self.min_pixels,
                                          self.max_pixels, self.max_tiles)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def __call__(self, samples: Sequence[dict], skipped: Counter | None = None) -> dict:
        skipped = Counter() if skipped is None else skipped
        samples = list(samples)
        if self.shuffle_images and len(samples) > 1:
            images = [s["images"] for s in samples]
            shift = random.Random(self.seed + len(samples)).randrange(1, len(samples))
            samples = [dict(s, images=images[(i + shift) % len(samples)]) for i, s in enumerate(samples)]
        prompts = [chat.render_prompt(self.processor, s["question"], len(s["images"]),
                                      system=self.system_prompt, options=s.get("options"))
                   for s in samples]
        enc = self._encode(prompts, [s["images"] for s in samples])
        lengths = enc["attention_mask"].sum(1)
        too_long = (lengths > self.max_prompt_length).tolist()
        if any(too_long):
            if self.on_overlong == "error":
                i = too_long.index(True)
                raise PromptTooLongError(
                    f"sample {samples[i].get('id')!r}: prompt is {int(lengths[i])} tokens (image tokens "
                    f"included) > max_prompt_length={self.max_prompt_length}. Raise "
                    "--data.init_args.max_prompt_length, lower the image resolution, or set "
                    "--data.init_args.on_overlong skip.")
            keep = [i for i, t in enumerate(too_long) if not t]
            skipped["prompt_too_long"] += len(too_long) - len(keep)
            samples = [samples[i] for i in keep]
            if not samples:
                return {"inputs": None, "meta": {}, "skipped": dict(skipped)}
            prompts = [prompts[i] for i in keep]
            enc = self._encode(prompts, [s["images"] for s in samples])
        batch = {
            "prompt": {k: v for k, v in enc.items() if k in _TOKEN_KEYS},
            "images": {k: v for k, v in enc.items() if k not in _TOKEN_KEYS},
            "meta": {key: [s.get(key) for s in samples]
                     for key in ("id", "question", "answer", "options", "subject", "difficulty")},
            "skipped": dict(skipped),
        }
        if self.mode == "sft":
            targets = [chat.render_target(s.get("trace") or "", s["answer"], eos=self.tokenizer.eos_token)
                       for s in samples]
            target_ids = self.tokenizer(targets, add_special_tokens=False)["input_ids"]
            batch["inputs"], batch["labels"], _ = append_targets(batch["prompt"], target_ids,
                                                                 self.tokenizer.pad_token_id)
        else:
            batch["inputs"] = batch["prompt"]
            # Rollout engines re-encode raw prompts (vLLM takes text + PIL images; GRPO repeats
            # each prompt G times), so the raw material travels with the batch.
            batch["meta"]["prompt_text"] = prompts
            batch["meta"]["pil_images"] = [s["images"] for s in samples]
        return batch

    def encode_prompts(self, texts: list[str], images: list[list]) -> tuple[dict, dict]:
        """Rendered prompt texts + their images → (token tensors, image tensors), left-padded."""
        enc = self._encode(texts, images)
        return ({k: v for k, v in enc.items() if k in _TOKEN_KEYS},
                {k: v for k, v in enc.items() if k not in _TOKEN_KEYS})

    def _encode(self, texts: list[str], images: list[list]) -> dict:
        flat = [img for imgs in images for img in imgs]
        kwargs = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
        if flat:
            kwargs["images"] = images
            kwargs.update(self._image_kwargs)
        return dict(self.processor(**kwargs))



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
