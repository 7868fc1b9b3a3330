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
from r1v3.rl.rollout import HFGenerateEngine, Prompt, RolloutEngine


def build_engine(kind: Literal["hf", "vllm"], *, model_dir: str, model: torch.nn.Module | None, encoder, tokenizer,
                 vllm_config=None, seed: int = 0, family: str = "", group_of: Callable[[str], str | None] | None = None,
                 suppress_tokens: Sequence[int] = (), max_batch_rows: int = 256) -> RolloutEngine:
    """``hf``: ``generate`` on ``model`` itself. ``vllm``: an embedded vLLM engine on ``model_dir``
    (its weights then come from ``sync_weights``), given the trainer's image settings (tiling,
    resolution) so that it encodes each image as the trainer does."""
    if kind == "vllm":
        from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine, vllm_name_mapper

        return VLLMEngine(model_dir, vllm_config or VLLMConfig(), seed=seed, rename=vllm_name_mapper(family),
                          group_of=group_of, suppress_tokens=suppress_tokens,
                          mm_processor_kwargs=getattr(encoder, "image_kwargs", None))
    return HFGenerateEngine(model, encoder, tokenizer, max_batch_rows=max_batch_rows, suppress_tokens=suppress_tokens)


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

    def mark_stale(self, force: bool = False) -> None:
        """The policy changed (``force``: the engine's weights are not the run's at all, e.g. after
        a resume, so every tensor is pushed regardless of the engine's sync schedule)."""
        self.stale = True
        self.force = self.force or force

    def __enter__(self) -> RolloutEngine:
        self.engine.wake()
        if self.stale:
            model, groups = self.policy()
            # force: every tensor, outside the engine's own sync schedule
            self.last_sync = self.engine.sync_weights(model, None if self.force else groups, force=self.force) or {}
            self.stale = self.force = False
        return self.engine

    def __exit__(self, *exc) -> None:
        self.engine.sleep()


def check_prompt_agreement(engine: RolloutEngine, prompts: Sequence[Prompt], encoded: EncodedPrompts,
                           ids: Sequence, placeholder_ids: Sequence[int], image_kwargs: dict) -> None:
    """An engine that runs its own processor (vLLM) must condition on the prompt tokens the trainer
    encodes, image tokens included, or every sample is trained on a prompt it was not drawn from.
    A mismatch is one ``UserError`` naming both sides; an engine that takes the trainer's
    encoding (HF) agrees by construction."""
    if not hasattr(engine, "prompt_token_ids"):
        return
    placeholders = set(placeholder_ids)
    for i, engine_ids in enumerate(engine.prompt_token_ids(prompts)):
        trainer_ids = encoded.tokens[i]["input_ids"].tolist()
        if engine_ids != trainer_ids:
            images = [sum(t in placeholders for t in seq) for seq in (engine_ids, trainer_ids)]
            raise UserError(
                f"the rollout engine and the trainer encode sample {ids[i]!r} differently: {len(engine_ids)} tokens "
                f"({images[0]} image tokens) in the engine, {len(trainer_ids)} ({images[1]} image tokens) in the "
                f"trainer, whose image settings are {image_kwargs or 'the processor defaults'}; give the engine "
                "the same (the stage passes it the data module's max_tiles / min_pixels / max_pixels)")
