"""Rank helpers that the rollout, log-prob and update code need without the FSDP strategy itself.

Every forward/backward of a sharded module is a collective: all ranks must run the same number of
them, in the same order. These helpers tell whether a model is sharded and let ranks agree on counts.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule


def is_sharded(model: torch.nn.Module | None) -> bool:
    """FSDP2 (``fully_shard``) or FSDP1 (wrapped blocks) anywhere in ``model``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model is not None and any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


# Path components that FSDP1, activation-checkpoint wrappers and torch.compile insert into names.
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model (and its checkpoint) spells it."""
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def is_fsdp2(model: torch.nn.Module | None) -> bool:
    """Sharded with FSDP2 (``fully_shard``), not FSDP1."""
    return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def synced_generate(model: torch.nn.Module) -> bool:
    """HF ``generate`` must keep every rank stepping until all are done when the weights are
    sharded: each decoding step is an all-gather (transformers only detects its own FSDP wrapping)."""
    return is_sharded(model) and world_size() > 1


def max_over_ranks(value: int, model: torch.nn.Module | None, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all ranks if ``model`` is sharded over several processes (so its
    forward passes are collectives every rank must join), else ``value``. A collective itself then."""
    if world_size() == 1 or not is_sharded(model):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)  # nccl reduces device tensors only
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded form (a no-op for units that are)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def as_placed(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a whole tensor, the same on every rank) laid out as ``like``: sharded the same
    way when ``like`` is a DTensor. A collective in that case."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and not isinstance(tensor, DTensor):
        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)
    return tensor
