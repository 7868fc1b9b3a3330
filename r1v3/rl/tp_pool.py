"""Tensor-parallel rollout engines beside a multi-rank trainer.

Colocated with FSDP under vLLM's ``external_launcher``, the ``tp`` consecutive ranks of a tensor-
parallel group run one engine between them, and every rank of the group must submit the same
requests in the same order (vLLM's colocate mode; TRL pools its prompts the same way). Each r1v3
rank has its own prompts, so before each engine call the group gathers everyone's prompts and
sampling parameters, each rank submits all of them, every prompt with its own rank's parameters
(seeds included, so a prompt draws the same samples as without pooling), and keeps the outputs of
its own.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from r1v3.errors import UserError


def tp_groups(world: int, tp: int) -> list[list[int]]:
    """The ranks of each tensor-parallel group: consecutive, as vLLM forms them."""
    if tp < 1 or world % tp:
        raise UserError(f"vllm.tensor_parallel_size {tp} must divide the number of processes ({world})")
    return [list(range(start, start + tp)) for start in range(0, world, tp)]


def new_tp_group(tp: int):
    """This rank's tensor-parallel process group. A collective: every rank calls it, at once."""
    group, _ = torch.distributed.new_subgroups_by_enumeration(tp_groups(torch.distributed.get_world_size(), tp))
    return group


def pooled(group, prompts: Sequence[Any], params: Any, run: Callable[[list, list], Sequence[Any]]) -> list:
    """``run(all prompts of the group, each prompt's own member's params)`` on every member, which
    must return one output per prompt; each member gets back the outputs of its own ``prompts``."""
    members = torch.distributed.get_world_size(group)
    gathered: list = [None] * members
    torch.distributed.all_gather_object(gathered, (list(prompts), params), group=group)
    me = torch.distributed.get_rank(group)
    start = sum(len(p) for p, _ in gathered[:me])
    outputs = run([p for member, _ in gathered for p in member],
                  [member_params for member, member_params in gathered for _ in member])
    return list(outputs[start:start + len(prompts)])
