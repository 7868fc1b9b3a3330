"""Shared-prompt passes: the G completions of a GRPO group share one prompt, so its tokens and its
images go through the model once and all G completions attend to that one KV cache.

Against running each of the N = P·G (prompt + completion) rows whole, this removes (G-1)/G of the
prompt tokens, the vision-tower passes and the image preprocessing from every rollout prefill and
every log-prob forward/backward. It is exact, not an approximation: a causal model's prompt keys
and values do not depend on what follows, and autograd sums the G completions' gradients into the
one prompt pass through the cache's ``index_select``. Positions are passed explicitly so each row
sees the positions it would have had unpadded (multimodal RoPE included), and ``tests/
test_prefix.py`` checks log-probs and gradients against the plain per-row computation.

Under activation checkpointing each layer runs its forward twice, once more in the backward. The
passes therefore use a cache that a replay cannot corrupt: the prompt pass stores each layer's keys
and values the first time only, and the completion pass reads them without appending its own. With
that, the layers may keep the cache while checkpointed (transformers otherwise drops it, since its
ordinary cache would grow a second time during the replay).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from r1v3.distributed import is_fsdp2, is_sharded
from r1v3.encoding import EncodedPrompts, append_targets
from r1v3.rl import packing


def prompt_positions(model: torch.nn.Module, tokens: dict, images: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of left-padded prompts (as if unpadded) and each row's next position.

    Models with multimodal RoPE (Qwen2-VL family: ``get_rope_index``) place image tokens on a 3-D
    grid; text after the prompt continues from the grid's largest position, which their
    ``rope_deltas`` give. Everything else counts real tokens.
    """
    mask = tokens["attention_mask"]
    real = mask.sum(1)
    inner = getattr(model, "model", None)
    if hasattr(inner, "get_rope_index"):
        extra = {k: images[k] for k in ("image_grid_thw", "video_grid_thw") if k in images}
        if "mm_token_type_ids" in tokens:
            extra["mm_token_type_ids"] = tokens["mm_token_type_ids"]
        positions, deltas = inner.get_rope_index(tokens["input_ids"], attention_mask=mask, **extra)
        return positions, real + deltas.view(-1).to(real.device)
    return (mask.long().cumsum(1) - 1).clamp(min=0), real


class PromptCache(DynamicCache):
    """The prompts' keys and values, safe to replay: each layer is stored once (a checkpointed
    layer's backward replay returns its recomputed states and stores nothing), and a cache made
    by ``for_rows`` is read-only, so a replayed completion pass sees the same prompt states again."""

    def __init__(self):
        super().__init__()
        self.read_only = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.read_only:
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)
        if layer_idx < len(self.layers) and self.layers[layer_idx].is_initialized:  # a replay
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def for_rows(self, prompt_index: torch.Tensor) -> "PromptCache":
        """A read-only cache whose row i is prompt ``prompt_index[i]``; differentiable, so the rows'
        gradients sum back into their prompt's pass."""
        rows = PromptCache()
        for layer in self.layers:
            copy = DynamicLayer()
            copy.lazy_initialization(layer.keys, layer.values)
            copy.keys, copy.values = layer.keys[prompt_index], layer.values[prompt_index]
            rows.layers.append(copy)
        rows.read_only = True
        return rows


def prefill(model: torch.nn.Module, tokens: dict, images: dict, cache=None):
    """One pass over the prompts: (KV cache, logits at each prompt's last token, next positions).
    Without ``cache`` the model's own (growable, for generation) is used."""
    positions, following = prompt_positions(model, tokens, images)
    out = model(**tokens, **images, position_ids=positions, use_cache=True, logits_to_keep=1,
                past_key_values=cache)
    return out.past_key_values if cache is None else cache, out.logits[:, -1], following


@contextlib.contextmanager
def _layers_keep_cache(model: torch.nn.Module):
    """Let checkpointed layers receive the (replay-safe) ``PromptCache``. The flag is transformers'
    own opt-in for layers that replay safely; it is read when the layer is called, so it is only
    needed during the forwards."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def completion_logits(model: torch.nn.Module, tokens: dict, images: dict, prompt_index: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Logits [N, T, V] that predicted each completion token: row i continues prompt
    ``prompt_index[i]`` of the (left-padded) ``tokens``/``images`` batch with ``completion_ids[i]``
    (right-padded, ``completion_mask`` 1 on real tokens)."""
    width = completion_ids.shape[1]
    with _layers_keep_cache(model):
        prompts, first, following = prefill(model, tokens, images, PromptCache())
        if width == 1 and not is_sharded(model):
            return first[prompt_index, None]
        # Token t is predicted at token t-1's position; the prompt's last position predicted token 0.
        # Sharded, every micro-batch runs both forwards (collectives), so a batch of one-token
        # completions still runs the continuation, on one masked token whose logits are dropped.
        feed = completion_ids[:, :-1] if width > 1 else completion_ids
        fed_mask = completion_mask[:, :-1] if width > 1 else torch.zeros_like(completion_mask)
        prompt_mask = tokens["attention_mask"][prompt_index]
        positions = following[prompt_index, None] + torch.arange(feed.shape[1], device=feed.device)
        if packing.enabled(model) and fed_mask.any():
            out = packing.forward(model, feed, fed_mask, positions, prompt=prompts.for_rows(prompt_index),
                                  prompt_mask=prompt_mask)
        else:
            mask = torch.cat([prompt_mask, fed_mask.to(prompt_mask)], 1)
            out = model(input_ids=feed, attention_mask=mask, position_ids=positions,
                        past_key_values=prompts.for_rows(prompt_index), use_cache=True).logits
    return torch.cat([first[prompt_index, None], out], 1)[:, :width]


def per_row_completion_logits(model: torch.nn.Module, tokens: dict, images: dict, completion_ids: torch.Tensor,
                              completion_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The straightforward computation ``completion_logits`` must equal: each row's prompt (row i
    of ``tokens``/``images``) and completion run whole. Used where a cache cannot be shared: under
    FSDP1, and with a transformers too old to let checkpointed layers keep a cache."""
    width = completion_ids.shape[1]
    targets = [row[: int(n)].tolist() for row, n in zip(completion_ids, completion_mask.sum(1))]
    inputs, _, start = append_targets({k: v.cpu() for k, v in tokens.items()}, targets, pad_id)
    device = completion_ids.device
    logits = whole_rows_output(model, {k: v.to(device) for k, v in inputs.items()}, images)
    index = (start.to(device)[:, None] - 1 + torch.arange(width, device=device)[None]).clamp(max=logits.shape[1] - 1)
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


def whole_rows_output(model: torch.nn.Module, inputs: dict, images: dict) -> torch.Tensor:
    """``model(...).logits`` over whole rows (``inputs``: input_ids and attention_mask, any padding
    side), padding-free where the model allows it (r1v3.rl.packing): padding positions then hold
    zeros. The per-row pass and SFT's loss both run their rows through here."""
    if packing.enabled(model):
        return packing.forward(model, inputs["input_ids"], inputs["attention_mask"],
                               prompt_positions(model, inputs, images)[0], images)
    return model(**inputs, **images, use_cache=False).logits


def shares_prompts(model: torch.nn.Module) -> bool:
    """Whether a group's rows can share one prompt pass: yes, sharded with FSDP2 or not (FSDP2 runs
    the two forwards and one backward like any module; tests/test_fsdp.py checks the gradients),
    with activation checkpointing or not, except under FSDP1 (untested) and, with checkpointing, on
    a transformers whose checkpointed layers cannot keep a cache (before the opt-in flag)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    fsdp1 = is_sharded(model) and not is_fsdp2(model)
    checkpointed_without_cache = (getattr(model, "is_gradient_checkpointing", False)
                                  and not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"))
    return not (fsdp1 or checkpointed_without_cache)


def rows_completion_logits(model: torch.nn.Module, encoded: EncodedPrompts, owners: list[int],
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor, device) -> torch.Tensor:
    """Logits [N, T, V] for completions whose prompts are ``encoded``'s prompts ``owners[i]``: one
    pass per distinct prompt where the model allows it, else per row. Nothing is re-encoded."""
    share = shares_prompts(model)
    unique = sorted(set(owners)) if share else owners
    tokens, images = encoded.batch(unique)
    tokens = {k: v.to(device) for k, v in tokens.items()}
    images = {k: v.to(device) for k, v in images.items()}
    if not share:
        return per_row_completion_logits(model, tokens, images, completion_ids, completion_mask, encoded.pad_id)
    where = {p: i for i, p in enumerate(unique)}
    index = torch.tensor([where[p] for p in owners], device=device)
    return completion_logits(model, tokens, images, index, completion_ids, completion_mask)


def micro_batches(encoded: EncodedPrompts, completion_mask: torch.Tensor, rows: torch.Tensor, group_size: int,
                  budget: int, share: bool):
    """Cut ``rows`` into runs whose tokens fit ``budget``: completions, plus each prompt once per
    run when rows share their prompt's pass, else once per row."""
    current, used = [], 0
    for r in rows.tolist():
        p = r // group_size
        prompt_len = encoded.length(p)  # exact: image tokens depend on the processor and resolution
        completion = int(completion_mask[r].sum())
        cost = completion + (0 if share and any(q // group_size == p for q in current) else prompt_len)
        if current and used + cost > budget:
            yield torch.tensor(current)
            current, used = [], 0
            cost = prompt_len + completion
        current.append(r)
        used += cost
    if current:
        yield torch.tensor(current)
