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

from r1v3.lora import model_weights

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
