"""Pushing trainer weights into an in-process vLLM engine.

vLLM fuses HF tensors when it loads them (q/k/v → qkv_proj, gate/up → gate_up_proj, weight + bias
of one layer). A reload call that holds only part of such a module rebuilds it from uninitialised
memory, silently (measured; docs/vllm.md). So tensors travel in buckets that never split a
transformer block: everything under ``…layers.N.`` / ``…blocks.N.`` / ``…layer.N.`` goes together,
and every other module (embeddings, connector, heads) goes whole.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Sequence

import torch

from r1v3.distributed import clean_name
from r1v3.lora import model_weights, output_head_name, unadapted

_BLOCK = re.compile(r"^(.*?\.(?:layers|blocks|layer)\.\d+)\.")


def unit_of(name: str) -> str:
    """The smallest group of tensors vLLM must receive together: a transformer block, or else the
    parameter's parent module."""
    match = _BLOCK.match(name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0]


def bucketize(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 256 << 20) -> Iterator[list]:
    """Group (name, tensor) pairs into buckets of whole units, each at most ``bucket_bytes`` unless a
    single unit is larger."""
    units: "OrderedDict[str, list]" = OrderedDict()
    for name, tensor in named:
        units.setdefault(unit_of(name), []).append((name, tensor))
    bucket, size = [], 0
    for members in units.values():
        unit_size = sum(t.numel() * t.element_size() for _, t in members)
        if bucket and size + unit_size > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += members
        size += unit_size
    if bucket:
        yield bucket


def trainable_state(model: torch.nn.Module, keep: Callable[[str], bool], rename: Callable[[str], str] = lambda n: n,
                    merge: Callable[[str], bool] = lambda name: True):
    """(vLLM-side name, full tensor) for the parameters whose clean name ``keep`` accepts. Under
    LoRA the names are the checkpoint's (peft's ``.base_layer`` taken out) and a weight whose name
    ``merge`` accepts carries its adapter merged in; adapter tensors travel separately."""
    for name, tensor in model_weights(model, keep, merge):
        yield rename(name), tensor


def push_selection(model: torch.nn.Module, group_of: Callable[[str], str | None], groups: Sequence[str] | None,
                   served: Sequence[str] = (), force: bool = False):
    """What a push after an update sends, as three predicates on checkpoint names: (keep: pushed as
    a tensor, merge: pushed with its adapter merged in, by_adapter: left to the adapter, which the
    engine applies itself for the ``served`` groups; vLLM 0.32 adapts no output head).

    Pushed as tensors: every transformer block or module (``unit_of``) that holds a tensor of a
    fully trained group (``groups``; all if None) or an adapted weight the adapter does not carry,
    whole, since vLLM fuses q/k/v and gate/up. ``force`` pushes everything, the weights the
    adapter carries as their base (the engine loaded the same base from the directory)."""
    head = output_head_name(model) + "."

    def by_adapter(name: str) -> bool:
        return group_of(name) in served and not name.startswith(head)

    def changed(name: str) -> bool:  # a clean parameter name, peft's .base_layer included
        return (groups is None or group_of(name) in groups or name.endswith(".base_layer.weight")) \
            and not by_adapter(name)

    def merge(name: str) -> bool:
        return not by_adapter(name)
    if force:
        return (lambda name: True), merge, by_adapter
    units = {unit_of(unadapted(clean_name(n))) for n, _ in model.named_parameters() if changed(clean_name(n))}
    return (lambda name: unit_of(name) in units), merge, by_adapter
