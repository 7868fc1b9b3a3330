"""Entropy of the policy's next-token distribution, and a padding-safe masked mean.

Used for the critical-token entropy of Skywork-R1V3 (arXiv 2507.06167, §5.1; definition in
docs/design.md §1): H_t = -sum_v p_v log p_v in nats over the full vocabulary, taken from the logits at
position t-1 that produced token t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 (not NaN) when nothing is selected.

    Padded positions are dropped with ``torch.where`` rather than multiplied by 0, so a NaN or inf
    sitting in padding cannot leak into the result. The result stays connected to ``values`` for
    autograd even when the mask is empty.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)


def entropy_from_logits(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Entropy -sum p log p (nats) of softmax(logits) over the last dim; returns float32 [...].

    Works in float32 whatever the input dtype: in bf16, p log p of a 150K vocabulary loses most of
    its mass to rounding. The leading positions are flattened and processed ``chunk_size`` at a
    time, so the float32 copy and the log-softmax exist for at most ``chunk_size`` rows at once
    rather than for the whole [N, V] (at V≈150K a 4K-token response would need ~2.5 GB per copy).
    The saving is real under ``torch.no_grad()`` (monitoring); with autograd on, each chunk's
    intermediates are kept for the backward pass anyway.

    ``log_softmax`` keeps very large or very negative logits stable. Entries at -inf (a masked
    vocabulary) have p = 0 and contribute 0: their log p is replaced by 0 before the product, so
    neither the value nor the gradient sees 0 * (-inf) = NaN. A row that is -inf everywhere is no
    distribution at all and yields NaN.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        p = logp.exp()
        logp = torch.where(torch.isneginf(logp), torch.zeros((), device=logp.device), logp)
        parts.append(-(p * logp).sum(dim=-1))
    if not parts:
        return torch.zeros(lead, dtype=torch.float32, device=logits.device)
    return torch.cat(parts).view(lead)


def normalized_entropy(h: Tensor, vocab_size: int) -> Tensor:
    """H / ln|V|, in [0, 1]: comparable across vocabularies (ln|V| is the uniform maximum)."""
    if vocab_size < 2:
        raise ValueError("normalized entropy needs a vocabulary of at least 2 tokens")
    return h / math.log(vocab_size)


def critical_token_stats(entropy: Tensor, mask: Tensor, triggers: Tensor, vocab_size: int,
                         high_threshold: float) -> dict[str, float]:
    """Critical-token entropy summary of a batch of completions (docs/design.md §1, paper §5.1).

    ``entropy`` [N, T] holds H_t of the distribution that produced completion token t, ``mask``
    the real tokens and ``triggers`` the tokens that begin a trigger word. Returns:

    - ``critical_entropy`` / ``critical_entropy_norm``: mean H_t (nats, and / ln|V|) over the
      trigger positions. Both keys are absent, not NaN or 0, when no trigger occurs.
    - ``trigger_rate_per_1k``: trigger positions per 1,000 completion tokens.
    - ``token_entropy``: mean H_t over every completion token.
    - ``high_entropy_share``: share of tokens whose H_t / ln|V| exceeds ``high_threshold``.
    """
    mask = mask.bool()
    triggers = triggers.bool() & mask
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        return {}
    norm = normalized_entropy(entropy.float(), vocab_size)
    out = {
        "trigger_rate_per_1k": 1000.0 * int(triggers.sum()) / n_tokens,
        "token_entropy": float(entropy[mask].float().mean()),
        "high_entropy_share": float((norm[mask] > high_threshold).float().mean()),
    }
    if triggers.any():
        out["critical_entropy"] = float(entropy[triggers].float().mean())
        out["critical_entropy_norm"] = float(norm[triggers].mean())
    return out
