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

On GPU with flash-attn 2 the model gets ``r1v3_packed_flash`` instead: flash-attn's varlen
kernel takes the packed rows directly, with cumulative lengths per row and each row's prompt keys
gathered in front of its own (docs/performance.md, "Padding-free update").
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PACKED, PACKED_FLASH = "r1v3_packed_sdpa", "r1v3_packed_flash"
_forward = threading.local()  # set while a packed forward builds its masks: they are not needed


@dataclass
class Pack:
    """Where each row's tokens sit in the packed sequence, and what each may attend to."""

    index: torch.Tensor  # [N, T]: packed position of row i's token t (0 past the row's end)
    real: torch.Tensor  # [L]: the flat [N·T] indices of the valid positions, in packed order
    mask: torch.Tensor | None  # [N, 1, T, P + T] bool: prompt keys, then the row's own keys (causal)
    config: object  # the language model's config: only its attention layers unpack
    prompt: object = None  # per-row read-only prompt cache (r1v3.rl.prefix.PromptCache) or None
    varlen: dict | None = None  # flash-attn's cumulative lengths and key order (GPU path)


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
    if pack.prompt is not None:
        prompt_k, prompt_v = prompt_states(pack, module, r1v3_prompt)
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


def _flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, r1v3_pack=None,
                     r1v3_prompt=None, **kwargs):
    """The GPU counterpart: flash-attn's varlen kernel takes the packed rows as they are. With a
    shared prompt pass, row i's keys are its prompt's real keys followed by its own, and the kernel's
    causal mask (aligned to the end of each key run) lets query t see the prompt and its own first
    t + 1 keys."""
    from transformers.integrations.flash_attention import flash_attention_forward

    pack = r1v3_pack
    if pack is None or getattr(module, "config", None) is not pack.config:
        return flash_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **kwargs)
    from flash_attn import flash_attn_varlen_func

    varlen = pack.varlen
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [L, heads, d]
    if pack.prompt is not None:
        prompt_k, prompt_v = prompt_states(pack, module, r1v3_prompt)
        real = varlen["prompt_real"]  # [N, P] bool: the left-padded prompts' real positions
        k = torch.cat([prompt_k.transpose(1, 2)[real].to(k.dtype), k]).index_select(0, varlen["key_order"])
        v = torch.cat([prompt_v.transpose(1, 2)[real].to(v.dtype), v]).index_select(0, varlen["key_order"])
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # the kernel computes in half precision only
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    out = flash_attn_varlen_func(q, k, v, varlen["cu_q"], varlen["cu_k"], varlen["max_q"], varlen["max_k"],
                                 dropout_p=dropout if module.training else 0.0, softmax_scale=scaling, causal=True)
    return out.to(dtype)[None], None  # [1, L, h, d]


def layer_states(prompt, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = prompt.layers[layer_idx]
    return layer.keys, layer.values


def prompt_states(pack: Pack, module, given) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt keys and values of ``module``'s layer: ``given`` when a compiled layer was handed
    them (see ``compile_layers``), else read from the pack's prompt cache."""
    return given if given is not None else layer_states(pack.prompt, module.layer_idx)


def _unless_packed(build_mask):
    """transformers' mask builder, skipped while a packed forward runs: the pack carries its own."""
    def mask(*args, **kwargs):
        return None if getattr(_forward, "packed", False) else build_mask(*args, **kwargs)
    return mask


ALL_ATTENTION_FUNCTIONS.register(PACKED, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, _unless_packed(sdpa_mask))
ALL_ATTENTION_FUNCTIONS.register(PACKED_FLASH, _flash_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_FLASH, _unless_packed(flash_attention_mask))
IMPLEMENTATIONS = {"sdpa": PACKED, "flash_attention_2": PACKED_FLASH}  # what each becomes when packing


def language_config(model: torch.nn.Module):
    """The config the language model's attention layers read (InternVL, Qwen-VL, LLaVA: the text
    config; a text-only model: its own)."""
    for name, module in model.named_modules():
        if name.endswith("language_model") and hasattr(module, "config"):
            return module.config
    return model.config


def enable(model: torch.nn.Module) -> bool:
    """Route the language model's attention through ``r1v3_packed_sdpa`` (a model on SDPA) or
    ``r1v3_packed_flash`` (on flash-attn 2). Eager attention keeps padded batches, and so does
    sliding-window attention, which the pack's mask does not express. Returns whether packing is on."""
    config = language_config(model)
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    current = config._attn_implementation
    if current not in IMPLEMENTATIONS and current not in IMPLEMENTATIONS.values():
        return False
    config._attn_implementation = IMPLEMENTATIONS.get(current, current)
    model.r1v3_packed = config  # the config its packs name, found once rather than every forward
    return True


def enabled(model: torch.nn.Module) -> bool:
    return getattr(model, "r1v3_packed", None) is not None


def _layout(valid: torch.Tensor, prompt_mask: torch.Tensor | None, config) -> Pack:
    lengths = valid.sum(1)
    width = int(lengths.max())
    n = valid.shape[0]
    device = valid.device
    t = torch.arange(width, device=device)
    inside = t[None] < lengths[:, None]
    starts = lengths.cumsum(0) - lengths
    index = torch.where(inside, starts[:, None] + t[None], torch.zeros((), dtype=torch.long, device=device))
    real = inside.reshape(-1).nonzero().squeeze(1)
    if config._attn_implementation == PACKED_FLASH:
        return Pack(index, real, None, config, varlen=_varlen(lengths, prompt_mask))
    # Row-causal over the row's own tokens; a position past the row's end sees itself only, so no
    # query row is fully masked (SDPA would return NaN there, and NaN times a zero gradient is NaN).
    own = (t[None, :, None] >= t[None, None, :]) & inside[:, None, :]
    own = own | torch.eye(width, dtype=torch.bool, device=device)[None]
    if prompt_mask is not None:
        own = torch.cat([prompt_mask.bool()[:, None, :].expand(n, width, -1), own], 2)
    return Pack(index, real, own[:, None], config)


def _varlen(lengths: torch.Tensor, prompt_mask: torch.Tensor | None) -> dict:
    """flash-attn's varlen arguments: cumulative query and key lengths per row, and (with prompts)
    the order that turns [all prompts' real keys; all rows' own keys] into each row's prompt keys
    followed by its own."""
    def cumulative(n: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(n.cumsum(0), (1, 0)).to(torch.int32)

    out = {"cu_q": cumulative(lengths), "max_q": int(lengths.max())}
    if prompt_mask is None:
        return out | {"cu_k": out["cu_q"], "max_k": out["max_q"]}
    real = prompt_mask.bool()
    prompt_lengths = real.sum(1)
    total_prompt = int(prompt_lengths.sum())
    prompt_starts, own_starts = cumulative(prompt_lengths)[:-1].tolist(), cumulative(lengths)[:-1].tolist()
    order = [torch.cat([torch.arange(p0, p0 + int(p)), total_prompt + torch.arange(o0, o0 + int(n))])
             for p0, p, o0, n in zip(prompt_starts, prompt_lengths, own_starts, lengths)]
    keys = prompt_lengths + lengths
    return out | {"cu_k": cumulative(keys), "max_k": int(keys.max()), "prompt_real": real,
                  "key_order": torch.cat(order).to(lengths.device)}


def forward(model: torch.nn.Module, input_ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
            images: dict | None = None, prompt=None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s output (``.logits``: logits, or hidden states under ``head_bypassed``) at every
    position of ``input_ids`` [N, T], computed padding-free: positions where ``valid`` is False
    come back as zeros. ``positions`` [N, T] (or [3, N, T] for multimodal RoPE) are each row's
    position ids. ``prompt`` (a per-row read-only prompt cache) and ``prompt_mask`` [N, P] make
    row i continue its prompt's keys and values."""
    valid = valid.bool()
    pack = _layout(valid, prompt_mask, model.r1v3_packed)
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
    was = getattr(model, "r1v3_packed", None)
    model.r1v3_packed = None
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
