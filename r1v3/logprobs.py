"""Per-token log-probabilities, without materialising a full log-softmax copy of the logits."""

from __future__ import annotations

import torch


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., target] for each position; logits [..., V], targets [...].

    Computed as ``logit[target] - logsumexp(logits)`` in float32, which equals the log-softmax
    entry and avoids a second [..., V] tensor.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
