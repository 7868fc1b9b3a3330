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

from r1v3 import chat
from r1v3.errors import UserError
# Re-exported: these lived here before the encoding layer moved to r1v3.encoding.
from r1v3.encoding import (IGNORE_INDEX, TOKEN_KEYS, PromptEncoder, PromptTooLongError,  # noqa: F401
                           append_targets, family_of, image_kwargs, split_encoding)


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
    family: str | None = None  # the model's model_type, which picks the image settings
    image_check: Any = None  # r1v3.backbone.image_token_check of the model: image tokens == features
    encoder: PromptEncoder = field(init=False, repr=False)

    def __post_init__(self):
        self.encoder = PromptEncoder(self.processor, self.min_pixels, self.max_pixels, self.max_tiles, self.family)

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def __call__(self, samples: Sequence[dict], skipped: Counter | None = None) -> dict:
        skipped = Counter() if skipped is None else skipped
        samples = list(samples)
        if self.shuffle_images and len(samples) > 1:
            images = [s["images"] for s in samples]
            shift = random.Random(self.seed + len(samples)).randrange(1, len(samples))
            samples = [dict(s, images=images[(i + shift) % len(samples)]) for i, s in enumerate(samples)]
        for sample in samples:
            self.encoder.check_question(sample)
        prompts = [chat.render_prompt(self.processor, s["question"], len(s["images"]),
                                      system=self.system_prompt, options=s.get("options"))
                   for s in samples]
        if self.mode == "prompt":
            # Each prompt alone, each image processed once: rollouts, log-prob passes and monitors
            # build every batch they need from these tensors (r1v3.encoding).
            encoded = self.encoder.encode_each(prompts, [s["images"] for s in samples])
            lengths = [encoded.length(i) for i in range(len(encoded))]
        else:
            enc = self.encoder.encode(prompts, [s["images"] for s in samples])
            lengths = enc["attention_mask"].sum(1).tolist()
        if self.image_check is not None:  # before the length check: a mismatch makes lengths meaningless
            self._check_image_tokens(samples, prompts, encoded if self.mode == "prompt" else None,
                                     None if self.mode == "prompt" else enc)
        too_long = [n > self.max_prompt_length for n in lengths]
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
            if self.mode == "prompt":
                encoded = encoded.select(keep)
            else:
                enc = self.encoder.encode(prompts, [s["images"] for s in samples])
        if self.mode == "prompt":
            tokens, images = encoded.batch()
        else:
            tokens, images = split_encoding(enc)
        batch = {
            "prompt": tokens,
            "images": images,
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
            batch["encoded"] = encoded
            # vLLM takes text + PIL images and runs its own processor, so the raw prompts travel too.
            batch["meta"]["prompt_text"] = prompts
            batch["meta"]["pil_images"] = [s["images"] for s in samples]
        return batch

    def _check_image_tokens(self, samples: list[dict], prompts: list[str], encoded, batch: dict | None) -> None:
        """Every prompt holds as many image tokens as its images give features, or the run stops
        here naming the sample, not in the model's forward (the mismatch crash the established
        frameworks report most). An SFT batch, encoded as one, is checked as a whole; only a
        mismatch re-encodes its samples one by one, to name the one at fault."""
        if batch is not None:
            tokens, images = split_encoding(batch)
            if len(set(self.image_check(tokens["input_ids"], images))) == 1:
                return
        for i, sample in enumerate(samples):
            if not sample["images"]:
                continue
            one = encoded.select([i]) if encoded is not None else self.encoder.encode_each([prompts[i]],
                                                                                            [sample["images"]])
            tokens, features = self.image_check(one.tokens[0]["input_ids"], one.images[0])
            if features is not None and tokens != features:
                raise UserError(
                    f"sample {sample.get('id')!r}: its prompt holds {tokens} image tokens but its "
                    f"{len(sample['images'])} image(s) give the model {features} features (image settings "
                    f"{self.encoder.image_kwargs}): the processor and the model disagree, e.g. on "
                    "image_seq_length in processor_config.json; save the checkpoint's processor with its model")

    def encode_prompts(self, texts: list[str], images: list[list]) -> tuple[dict, dict]:
        """Rendered prompt texts + their images → (token tensors, image tensors), left-padded."""
        return self.encoder.encode_prompts(texts, images)

    def encode_each(self, texts, images):
        return self.encoder.encode_each(texts, images)
