"""Padding-free forwards: a batch of rows of different lengths runs as one packed sequence of its
real tokens, so the layers' matrix multiplies, norms and RoPE never touch a padding token.

Rollout completions stop at EOS and SFT traces vary in length; padded, every row costs as much as
the longest. Packed, the language model sees ``[1, L]`` tokens (L = the real tokens of all rows)
with each row's own position ids, and only attention needs the rows apart. That is done by
attention implementation ``r1v3_packed_sdpa``, registered with transformers'
``AttentionInterface`` and set on the language model's config alone (the vision tower keeps its
own): given the pack (a keyword argument of the forward, which transformers hands to every
attention call and which activation checkpointing replays with the layer), it gathers each row's
queries, keys and values into a [rows, width] layout, prepends the row's prompt keys and values
when the rows continue a shared prompt pass (:mod:`r1v3.rl.prefix`), runs one SDPA with the
row-causal mask, and scatters the real positions back. Attention therefore costs what it costs
padded; everything else shrinks by the padding share. Without a pack (generation, the prompt
pass, monitoring) the implementation is transformers' SDPA, mask included, unchanged.

On GPU, flash-attn's varlen kernel would take the packed sequence directly (``cu_seqlens``);
that path is not built yet, so a model loaded with ``flash_attention_2`` keeps padded batches
(docs/performance.md, "Padding-free update").
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PACKED = "r1v3_packed_sdpa"
_forward = threading.local()  # set while a packed forward builds its masks: they are not needed


@dataclass
class Pack:
    """Where each row's tokens sit in the packed sequence, and what each may attend to."""

    index: torch.Tensor  # [N, T]: packed position of row i's token t (0 past the row's end)
    real: torch.Tensor  # [L]: the flat [N·T] indices of the valid positions, in packed order
    mask: torch.Tensor  # [N, 1, T, P + T] bool: prompt keys, then the row's own keys (causal)
    config: object  # the language model's config: only its attention layers unpack
    prompt: object = None  # per-row read-only prompt cache (r1v3.rl.prefix.PromptCache) or None


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, r1v3_pack=None, r1v3_prompt=None,
               **kwargs):
    pack = r1v3_pack
    if pack is None or getattr(module, "config", None) is not pack.config:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    heads = query.shape[1]
    flat = pack.index.reshape(-1)

    def rows(x: torch.Tensor) -> torch.Tensor:  # [1, h, L, d] -> [N, h, T, d]
        return x[0].index_select(1, flat).unflatten(1, pack.index.shape).transpose(0, 1)

    q, k, v = rows(query), rows(key), rows(value)
    if pack.prompt is not None:  # a compiled layer is handed its prompt states (see ``compile_layers``)
        prompt_k, prompt_v = r1v3_prompt if r1v3_prompt is not None else layer_states(pack.prompt, module.layer_idx)
        k, v = torch.cat([prompt_k.to(k.dtype), k], 2), torch.cat([prompt_v.to(v.dtype), v], 2)
    gqa = {}
    if k.shape[1] != heads:
        if k.device.type == "cpu" or use_gqa_in_sdpa(pack.mask, k, v):  # CPU SDPA takes GQA with a mask
            gqa = {"enable_gqa": True}
        else:
            k, v = repeat_kv(k, heads // k.shape[1]), repeat_kv(v, heads // v.shape[1])
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=pack.mask, dropout_p=dropout if module.training else 0.0, scale=scaling, **gqa)
    out = out.transpose(1, 2).flatten(0, 1).index_select(0, pack.real)
    return out[None], None  # [1, L, h, d], as transformers' SDPA returns


def layer_states(prompt, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = prompt.layers[layer_idx]
    return layer.keys, layer.values


def _mask(*args, **kwargs):
    if getattr(_forward, "packed", False):
        return None
    return sdpa_mask(*args, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(PACKED, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, _mask)


def language_config(model: torch.nn.Module):
    """The config the language model's attention layers read (InternVL, Qwen-VL, LLaVA: the text
    config; a text-only model: its own)."""
    for name, module in model.named_modules():
        if name.endswith("language_model") and hasattr(module, "config"):
            return module.config
    return model.config


def enable(model: torch.nn.Module) -> bool:
    """Route the language model's attention through ``r1v3_packed_sdpa``. Only a model on SDPA
    qualifies (eager and flash-attn keep padded batches), and not with sliding-window attention,
    which the pack's mask does not express. Returns whether packing is on."""
    config = language_config(model)
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    if config._attn_implementation not in ("sdpa", PACKED):
        return False
    config._attn_implementation = PACKED
    model.r1v3_packed = True
    return True


def enabled(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "r1v3_packed", False))


def _layout(valid: torch.Tensor, prompt_mask: torch.Tensor | None, config) -> Pack:
    lengths = valid.sum(1)
    width = int(lengths.max())
    n = valid.shape[0]
    device = valid.device
    t = torch.arange(width, device=device)
    inside = t[None] < lengths[:, None]
    starts = lengths.cumsum(0) - lengths
    index = torch.where(inside, starts[:, None] + t[None], torch.zeros((), dtype=torch.long, device=device))
    # Row-causal over the row's own tokens; a position past the row's end sees itself only, so no
    # query row is fully masked (SDPA would return NaN there, and NaN times a zero gradient is NaN).
    own = (t[None, :, None] >= t[None, None, :]) & inside[:, None, :]
    own = own | torch.eye(width, dtype=torch.bool, device=device)[None]
    if prompt_mask is not None:
        own = torch.cat([prompt_mask.bool()[:, None, :].expand(n, width, -1), own], 2)
    return Pack(index, inside.reshape(-1).nonzero().squeeze(1), own[:, None], config)


def forward(model: torch.nn.Module, input_ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
            images: dict | None = None, prompt=None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s output (``.logits``: logits, or hidden states under ``head_bypassed``) at every
    position of ``input_ids`` [N, T], computed padding-free: positions where ``valid`` is False
    come back as zeros. ``positions`` [N, T] (or [3, N, T] for multimodal RoPE) are each row's
    position ids. ``prompt`` (a per-row read-only prompt cache) and ``prompt_mask`` [N, P] make
    row i continue its prompt's keys and values."""
    valid = valid.bool()
    pack = _layout(valid, prompt_mask, language_config(model))
    pack.prompt = prompt
    packed_positions = positions[:, valid][:, None] if positions.dim() == 3 else positions[valid][None]
    _forward.packed = True
    try:
        out = model(input_ids=input_ids[valid][None], position_ids=packed_positions, attention_mask=None,
                    use_cache=False, r1v3_pack=pack, **(images or {})).logits
    finally:
        _forward.packed = False
    padded = out.new_zeros(*valid.shape, out.shape[-1])
    padded[valid] = out[0]
    return padded


@contextlib.contextmanager
def disabled(model: torch.nn.Module):
    """Inside, passes over ``model`` run padded (as the reference of the packed path)."""
    was = enabled(model)
    model.r1v3_packed = False
    try:
        yield
    finally:
        model.r1v3_packed = was


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers (the modules holding ``self_attn``)."""
    for name, module in model.named_modules():
        if name.endswith("language_model.layers") or name.endswith("model.layers"):
            return list(module)
    return []


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder layer for the packed forwards only (opt-in: ``load.compile``).

    Packed calls have one shape family, ``[1, L]`` tokens with L dynamic, so a run compiles a
    bounded number of graphs whatever its lengths; generation and the padded prompt pass (caches,
    masks, one-token decode steps) stay eager and never trigger a recompile. Each layer is handed
    its prompt keys and values here, outside the compiled region: read inside, the layer's index
    would be a constant of the graph and every layer would compile its own. Returns the number of
    layers wrapped."""
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "r1v3_compiled", False):
            continue
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True)

        def forward(*args, _eager=eager, _compiled=compiled, _index=layer.self_attn.layer_idx, **kwargs):
            pack = kwargs.get("r1v3_pack")
            if pack is None:
                return _eager(*args, **kwargs)
            if pack.prompt is not None:
                kwargs["r1v3_prompt"] = layer_states(pack.prompt, _index)
            return _compiled(*args, **kwargs)

        layer.forward = forward
        layer.r1v3_compiled = True
    return len(layers)
