"""Per-token log-probabilities of the distribution a rollout engine actually samples from."""

from __future__ import annotations

from typing import Sequence

import torch


def sampling_logits(logits: torch.Tensor, temperature: float, banned: Sequence[int] = (),
                    inplace: bool = False) -> torch.Tensor:
    """The logits of the distribution rollouts are drawn from, in float32: divided by the sampling
    temperature (greedy counts as 1) and with the banned tokens (image placeholders) at -inf.

    Both engines sample from exactly this (vLLM's ``allowed_token_ids`` and HF's
    ``suppress_tokens`` remove the banned tokens before the softmax), and vLLM reports its
    log-probs from it (``logprobs_mode="processed_logprobs"``), so the trainer, the engines and
    the log-prob gap all compare the same quantity at any temperature. Top-p truncation is not
    applied: the trainer scores the full tempered distribution (docs/vllm.md, "Log-probs").

    ``inplace`` transforms ``logits`` itself (copied only if not float32 already), for a caller
    that no longer needs them and cannot afford a second [rows, V] tensor (r1v3.rl.head)."""
    t = temperature if temperature > 0 else 1.0
    if not inplace:
        scaled = logits.float() / t
        if len(banned):
            scaled = scaled.index_fill(-1, torch.as_tensor(list(banned), device=scaled.device), float("-inf"))
        return scaled
    scaled = logits.float()
    if t != 1.0:
        scaled.div_(t)
    if len(banned):
        scaled.index_fill_(-1, torch.as_tensor(list(banned), device=scaled.device), float("-inf"))
    return scaled


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., target] for each position; logits [..., V], targets [...].

    Computed as ``logit[target] - logsumexp(logits)`` in float32, which equals the log-softmax
    entry and avoids a second [..., V] tensor.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
