"""Rollout engines: turn prompts (text + images) into G sampled completions each.

The GRPO stage talks to an engine only through :class:`RolloutEngine`, so the embedded vLLM engine
slots in beside the HF ``generate`` engine without touching the stage.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from r1v3.distributed import synced_generate
from r1v3.encoding import EncodedPrompts
from r1v3.logprobs import sampling_logits
from r1v3.rl import prefix

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """Sampling settings for one rollout call.

    Args:
        n: Samples per prompt (the GRPO group size G).
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus sampling mass.
        max_new_tokens: Generation budget per completion.
        stop: Extra stop strings (the tokenizer's EOS always stops).
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)


# Lightning checkpoints keep the stage's hyperparameters; allow-listing this plain config class lets
# them load with torch.load(weights_only=True), the default since torch 2.6.
torch.serialization.add_safe_globals([SamplingConfig])


@dataclass
class Prompt:
    text: str  # rendered in the chat template, ending with the assistant header
    images: list  # PIL images, one per placeholder


@dataclass
class Rollouts:
    """``n`` completions per prompt, prompt-major: rows ``i*n … i*n+n-1`` belong to prompt ``i``."""

    completion_ids: torch.Tensor  # [N, T], right-padded
    completion_mask: torch.Tensor  # [N, T], 1 on generated tokens (EOS included)
    logprobs: torch.Tensor  # [N, T], log-prob of each sampled token under the sampling softmax
    texts: list[str]
    finish_reasons: list[str]  # "stop" (EOS or a stop string), "length" (hit max_new_tokens) or "dropped"
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    @property
    def truncated(self) -> torch.Tensor:
        return torch.tensor([r == "length" for r in self.finish_reasons])


class RolloutEngine(Protocol):
    """What a stage needs from a rollout engine. Use it through :class:`r1v3.rl.engines.EngineSession`,
    which wakes it, syncs stale weights, and puts it back to sleep: nothing is pushed to a sleeping
    engine, and nothing generates on one."""

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seed: int | None = None,
                 encoded: EncodedPrompts | None = None) -> Rollouts:
        """``sampling.n`` completions per prompt. ``encoded``, when given, holds the same prompts
        already through the processor (engines that run the HF processor use it as is)."""
        ...

    def sync_weights(self, model: torch.nn.Module, groups: Sequence[str] | None = None, force: bool = False) -> dict:
        """Make the engine sample from ``model``'s current weights; returns timing stats. ``force``
        pushes every tensor now (a resumed run), whatever the engine's own schedule."""
        ...

    def wake(self) -> None:
        """Take back the memory given up by ``sleep`` (weights, cache)."""
        ...

    def sleep(self) -> None:
        """Free the memory the trainer needs for its update."""
        ...


# Entries of a checkpoint's generation config that say nothing about the sampling distribution.
_NOT_SAMPLING = {"transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                 "max_length", "max_new_tokens", "use_cache", "return_dict_in_generate", "num_return_sequences"}


def checkpoint_sampling_settings(generation_config) -> dict:
    """The settings of a checkpoint's ``generation_config.json`` (a ``GenerationConfig`` or None)
    that would change what a rollout samples: ``repetition_penalty``, ``min_p``,
    ``no_repeat_ngram_size``, a temperature, … Released instruct checkpoints ship such settings."""
    if generation_config is None:
        return {}
    return {k: v for k, v in generation_config.to_diff_dict().items()
            if k not in _NOT_SAMPLING and not k.startswith(("_", "output_", "cache_"))}


def warn_ignored_settings(settings: dict, engine: str) -> None:
    if settings:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))
        log.warning("[r1v3] the %s engine ignores the checkpoint's generation settings (%s): rollouts sample the "
                    "plain temperature-scaled distribution the trainer scores; set sampling.* instead", engine, listed)


@contextmanager
def own_generation_config(model: torch.nn.Module, tokenizer: Any):
    """Run ``generate`` under a generation config r1v3 builds, not the checkpoint's.

    transformers fills every setting a ``generate`` call leaves unset from ``model.generation_config``,
    so a checkpoint's ``repetition_penalty`` or ``no_repeat_ngram_size`` would reshape the sampling
    distribution while the trainer scores the plain one: samples trained as on-policy that are not
    (measured: with ``repetition_penalty=1.3`` greedy rollouts matched the trainer's argmax at 21 of
    32 positions). The checkpoint's config is restored afterwards, so exports keep it.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


class HFGenerateEngine:
    """Rollouts from ``generate`` on the policy itself: batched, left-padded, with KV cache.

    It shares the policy's weights, so weight sync is a no-op. Log-probs are those of the
    distribution sampled before top-p truncation (tempered, suppressed tokens out), which is what
    the trainer recomputes.
    """

    def __init__(self, model: torch.nn.Module, encoder: Any, tokenizer: Any, max_batch_rows: int = 256,
                 suppress_tokens: Sequence[int] = ()):
        self.model, self.encoder, self.tokenizer = model, encoder, tokenizer
        self.max_batch_rows = max_batch_rows
        self.suppress_tokens = list(suppress_tokens)  # image placeholders must never be generated
        warn_ignored_settings(checkpoint_sampling_settings(getattr(model, "generation_config", None)), "HF")

    def sync_weights(self, model: torch.nn.Module, groups: Sequence[str] | None = None, force: bool = False) -> dict:
        self.model = model  # the policy itself: nothing to push
        return {}

    def wake(self) -> None:
        pass

    def sleep(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seed: int | None = None,
                 encoded: EncodedPrompts | None = None) -> Rollouts:
        if seed is not None:
            torch.manual_seed(seed)
        if encoded is None:
            encoded = self.encoder.encode_each([p.text for p in prompts], [p.images for p in prompts])
        per_call = max(1, self.max_batch_rows // sampling.n)
        parts = [self._generate_rows(encoded, range(i, min(i + per_call, len(prompts))), sampling)
                 for i in range(0, len(prompts), per_call)]
        width = max(p[0].shape[1] for p in parts)
        ids = torch.cat([_pad_right(p[0], width, self.tokenizer.pad_token_id) for p in parts])
        mask = torch.cat([_pad_right(p[1], width, 0) for p in parts])
        logprobs = torch.cat([_pad_right(p[2], width, 0.0) for p in parts])
        reasons = [r for p in parts for r in p[3]]
        texts = self.tokenizer.batch_decode(ids * mask + self.tokenizer.pad_token_id * (1 - mask),
                                            skip_special_tokens=True)
        return Rollouts(ids, mask, logprobs, texts, reasons, sampling.n)

    def _generate_rows(self, encoded: EncodedPrompts, which: range, sampling: SamplingConfig):
        """``sampling.n`` completions of each prompt in ``which``. The prompts (all but their last
        token) are prefilled once and the cache is repeated n times, so the images and prompt tokens
        of a group go through the model once instead of n times (``r1v3.rl.prefix``)."""
        tokens, images = encoded.batch(which)
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items()}
        images = {k: v.to(device) for k, v in images.items()}
        index = torch.arange(len(which), device=device).repeat_interleave(sampling.n)
        greedy = sampling.temperature <= 0
        kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                      return_dict_in_generate=True, output_logits=True)
        if self.suppress_tokens:
            kwargs["suppress_tokens"] = self.suppress_tokens
        if synced_generate(self.model):  # every decoding step of a sharded model is a collective
            kwargs["synced_gpus"] = True
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        try:
            # The last prompt token stays uncached: generate's first step runs it and samples token 0.
            cache, _, following = prefix.prefill(self.model, {k: v[:, :-1] for k, v in tokens.items()}, images)
            cache.batch_select_indices(index)
            inner = getattr(self.model, "model", None)
            if hasattr(inner, "rope_deltas"):  # multimodal RoPE: generate continues from these offsets
                inner.rope_deltas = (following - tokens["attention_mask"][:, :-1].sum(1))[index, None]
            with own_generation_config(self.model, self.tokenizer):
                out = self.model.generate(input_ids=tokens["input_ids"][index],
                                          attention_mask=tokens["attention_mask"][index], past_key_values=cache,
                                          **kwargs)
        finally:
            self.model.train(was_training)
        completion = out.sequences[:, tokens["input_ids"].shape[1]:].cpu()
        # One [N, V] step at a time: never materialise [N, T, V] log-softmax. ``out.logits`` are
        # the raw ones, before the temperature and the suppression that sampling applied.
        logprobs = torch.stack([
            torch.log_softmax(sampling_logits(step.cpu(), sampling.temperature, self.suppress_tokens), dim=-1)
            .gather(1, completion[:, t:t + 1]).squeeze(1)
            for t, step in enumerate(out.logits)], dim=1)
        mask, reasons = completion_mask(completion, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                        sampling.max_new_tokens, bool(sampling.stop))
        return completion, mask, logprobs * mask, reasons


def drop_completions_with(rollouts: Rollouts, token_ids: Sequence[int], pad_id: int) -> torch.Tensor:
    """Empty, in place, every completion that holds one of ``token_ids`` (image placeholders), and
    return which rows were dropped. Both engines ban these tokens; a completion that holds one
    anyway must never reach a forward pass, where its placeholder would ask for image features
    that do not exist (the crash the established frameworks report most). The row stays in its
    group with no token and an empty text (so no reward), and the stage counts it."""
    if not token_ids:
        return torch.zeros(len(rollouts.texts), dtype=torch.bool)
    real = rollouts.completion_mask.bool()
    hit = (torch.isin(rollouts.completion_ids, torch.tensor(list(token_ids))) & real).any(1)
    for row in hit.nonzero().flatten().tolist():
        rollouts.completion_ids[row] = pad_id
        rollouts.completion_mask[row] = 0
        rollouts.logprobs[row] = 0.0
        rollouts.texts[row] = ""
        rollouts.finish_reasons[row] = "dropped"
    return hit


def completion_mask(ids: torch.Tensor, eos_id: int, pad_id: int, max_new_tokens: int,
                    has_stop_strings: bool) -> tuple[torch.Tensor, list[str]]:
    """Valid-token mask (through the first EOS) and finish reason per row.

    ``generate`` fills finished rows with the pad id; a row that ends in pads without an EOS was
    cut by a stop string.
    """
    n, width = ids.shape
    positions = torch.arange(width).expand(n, width)
    is_eos = ids == eos_id
    has_eos = is_eos.any(1)
    end = torch.where(has_eos, is_eos.float().argmax(1) + 1, torch.full((n,), width))
    reasons = []
    for i in range(n):
        if has_eos[i]:
            reasons.append("stop")
            continue
        row_end = width
        if has_stop_strings:
            non_pad = (ids[i] != pad_id).nonzero()
            row_end = int(non_pad[-1]) + 1 if len(non_pad) else 0
            end[i] = row_end
        reasons.append("length" if row_end >= max_new_tokens else "stop")
    return (positions < end[:, None]).long(), reasons


def _pad_right(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)
