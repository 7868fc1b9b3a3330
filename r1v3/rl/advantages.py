"""Group-relative advantages for GRPO.

GRPO (DeepSeekMath, arXiv 2402.03300, §4.1.2 "outcome supervision") replaces PPO's value model by
a baseline computed from the G samples drawn for the same prompt:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

and gives every token of sample i that same A_i. Skywork-R1V3 (arXiv 2507.06167) uses it as is.
The std is torch's unbiased one (divisor G-1), the convention of TRL and verl, so results line up
with those frameworks. Dr.GRPO (arXiv 2503.20783, §3.1) argues that dividing by the std biases
updates towards prompts that are nearly always solved or nearly always failed, and drops the
division; ``std_mode="none"`` gives that variant.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["group", "batch", "none"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    # Integer or half-precision rewards would make the mean/std inexact; float64 is kept as is.
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    return rewards.to(dtype).view(-1, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    std_mode: StdMode = "group",
    eps: float = 1e-6,
) -> Tensor:
    """Per-sample GRPO advantages, flat [B*G], same order as ``rewards``.

    ``rewards`` is flat [B*G]; the G samples of one prompt are contiguous.

    - ``"group"``: (r - group mean) / (group std + eps), DeepSeekMath's GRPO.
    - ``"batch"``: the mean is still per group, but the std is that of all B*G rewards (as TRL's
      ``scale_rewards="batch"``). A group whose rewards are all equal still gets 0, while the
      scale no longer blows up the advantages of a group with a tiny spread.
    - ``"none"``: r - group mean, no division (Dr.GRPO, arXiv 2503.20783).

    A group of size 1 has no unbiased std (divisor G-1 = 0) and its own mean as the only
    baseline, so it carries no relative signal: its advantage is defined as 0 in every mode.
    A group whose rewards are all equal also gets exactly 0, in every mode. Arithmetic alone would
    not give that: the float32 mean of eight 0.8s is one rounding step off 0.8, and dividing that
    residue by (0 + eps) turned it into -0.056 for every sample, a push in one direction from a
    group that holds no signal.
    """
    if std_mode not in ("group", "batch", "none"):
        raise ValueError(f"unknown std_mode {std_mode!r}")
    r = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(r).view(-1)
    centered = r - r.mean(dim=1, keepdim=True)
    if std_mode == "none":
        adv = centered
    elif std_mode == "group":
        adv = centered / (r.std(dim=1, keepdim=True) + eps)
    else:
        # numel >= 2 here because group_size >= 2, so the unbiased batch std is defined.
        adv = centered / (r.std() + eps)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # the test of zero_variance_groups
    return torch.where(flat, torch.zeros((), dtype=adv.dtype), adv).reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Bool [B]: True where all G rewards of a prompt are equal (exact comparison).

    Such groups have zero advantage for every sample, hence no policy gradient; DAPO's dynamic
    sampling (arXiv 2503.14476, §3.2) filters them out and the share of them is worth logging.
    Rewards of equal outcome come out of the same arithmetic and so compare equal exactly. A group
    of size 1 is always zero-variance.
    """
    r = _grouped(rewards, group_size)
    return (r == r[:, :1]).all(dim=1)


def soft_overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, §3.4, eq. 13), a reward term per
    completion of ``lengths`` tokens with L_max = ``max_len`` and L_cache = ``buffer``:

        0                                   if |y| ≤ L_max - L_cache,
        ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| ≤ L_max,
        -1                                  if |y| > L_max,

    times ``factor``: a penalty that grows linearly through the last ``buffer`` tokens of the
    budget, reaching -1 at the limit (DAPO: L_max 20480 with a 4096 buffer)."""
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"the overlong buffer must be in (0, {max_len}], got {buffer}")
    lengths = lengths.float()
    start = float(max_len - buffer)
    penalty = ((start - lengths) / buffer).clamp(min=-1.0, max=0.0)
    return factor * torch.where(lengths > max_len, torch.full_like(penalty, -1.0), penalty)
