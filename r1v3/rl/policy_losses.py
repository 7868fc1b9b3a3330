"""Policy-loss variants beside GRPO's clipped surrogate, chosen by name (``GRPOStage.policy_loss``).

All share :func:`r1v3.rl.losses.policy_loss`'s signature and conventions: ``logp``, ``old_logp``
and ``mask`` are [B, T]; ``old_logp`` and ``advantages`` are constants; ``weights`` [B, T] are
constant per-token factors (rollout correction, entropy controls); the result is reduced by
``aggregate`` with the given mode and comes with detached statistics (``ratio_stats``).

On-policy (``old_logp = logp.detach()``) every variant's ratio is exactly 1, and the gradients
coincide with a GRPO aggregation: GSPO and GSPO-token with ``seq-mean-token-mean``, CISPO with the
aggregation it is run with, SAPO (whose gate has slope 1 at ratio 1) with GRPO's under the same
aggregation. The variants differ only off-policy: several mini-batches or iterations per rollout
batch, or an engine whose log-probs differ from the trainer's. docs/algorithms.md has the table of
formulas and the hyperparameters each paper uses.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from r1v3.rl.losses import (LOG_RATIO_CLAMP, AggMode, aggregate, log_ratio, policy_loss, ratio_stats, token_advantages,
                            weighted)

PolicyLossName = Literal["grpo", "gspo", "gspo-token", "cispo", "sapo"]


def _sequence_advantages(advantages: Tensor, name: str) -> Tensor:
    if advantages.dim() != 1:
        raise ValueError(f"{name} needs one advantage per sequence ([B]), got shape {tuple(advantages.shape)}")
    return advantages.detach()


def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """[B] (1/|y_i|) Σ_t log(π/π_old): the log of GSPO's length-normalised sequence ratio."""
    n_tok = mask.sum(-1).clamp(min=1).to(logp.dtype)
    return (log_ratio(logp, old_logp, mask).sum(-1) / n_tok).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps_low: float = 3e-4,
              clip_eps_high: float = 4e-4, agg: AggMode = "seq-mean-token-mean", norm_length: int | None = None,
              weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al., arXiv 2507.18071, eq. 5–7): one importance ratio per sequence,

        s_i = (π(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp((1/|y_i|) Σ_t log ρ_i,t),
        loss_i = -min(s_i·A_i, clip(s_i, 1 - eps_low, 1 + eps_high)·A_i),

    clipped per sequence: a clipped sequence gives no gradient at all. The paper's objective is the
    mean of loss_i over sequences, which ``seq-mean-token-mean`` gives (loss_i is spread over the
    sequence's tokens); its clip ranges are 3e-4 and 4e-4 (§5.1), far below GRPO's 0.2 because
    s_i is a per-token geometric mean. Token ``weights`` average into a per-sequence factor.
    Stats count clipped sequences on their tokens (``clip_frac`` is then a token share)."""
    mask = mask.bool()
    adv = _sequence_advantages(advantages, "GSPO").to(logp.dtype)
    s = _sequence_log_ratio(logp, old_logp, mask).exp()
    per_seq = -torch.minimum(s * adv, s.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv)
    loss = aggregate(weighted(per_seq[:, None].expand_as(logp), weights), mask, agg, norm_length)
    with torch.no_grad():
        s_tok = s.detach()[:, None].expand_as(logp)
        high = ((s > 1.0 + clip_eps_high) & (adv > 0))[:, None].expand_as(mask)
        low = ((s < 1.0 - clip_eps_low) & (adv < 0))[:, None].expand_as(mask)
        return loss, ratio_stats(s_tok, s_tok.log(), mask, high, low)


def gspo_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps_low: float = 3e-4,
                    clip_eps_high: float = 4e-4, agg: AggMode = "seq-mean-token-mean", norm_length: int | None = None,
                    weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token (arXiv 2507.18071, eq. 13–14): the sequence ratio as a constant factor, the
    gradient per token,

        s_i,t = sg[s_i] · π(y_i,t) / sg[π(y_i,t)],
        loss_i,t = -min(s_i,t·A_i,t, clip(s_i,t, 1 - eps_low, 1 + eps_high)·A_i,t),

    so s_i,t equals s_i in value and ∇s_i,t = s_i·∇log π(y_i,t). With one advantage per sequence
    it equals GSPO in value and gradient; it differs when advantages or ``weights`` vary along a
    sequence. ``advantages`` may be [B] or [B, T]."""
    mask = mask.bool()
    adv = token_advantages(advantages, logp)
    s_seq = _sequence_log_ratio(logp, old_logp, mask).detach().exp()
    token = torch.where(mask, logp, logp.detach())  # padding: value 1 below, and no gradient
    s = s_seq[:, None] * (token - token.detach()).exp()
    per_token = -torch.minimum(s * adv, s.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv)
    loss = aggregate(weighted(per_token, weights), mask, agg, norm_length)
    with torch.no_grad():
        high, low = (s > 1.0 + clip_eps_high) & (adv > 0), (s < 1.0 - clip_eps_low) & (adv < 0)
        return loss, ratio_stats(s.detach(), s.detach().log(), mask, high, low)


def cispo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps_low: float = 1.0,
               clip_eps_high: float = 0.28, agg: AggMode = "token-mean", norm_length: int | None = None,
               weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4–5): the importance weight is clipped and is a
    constant; every token keeps its gradient,

        loss_t = -sg[clip(ρ_t, 1 - eps_low, 1 + eps_high)] · A_t · log π(y_t),

    reduced over all tokens (``token-mean``, the paper's 1/Σ|o_i|). MiniMax-M1 sets no lower bound
    (a large eps_low: 1.0 clips at 0, which a ratio never reaches) and tunes eps_high only; the
    paper does not print its value, so the default 0.28 is DAPO's clip-higher bound, the one
    Trinity-RFT's CISPO uses. ``clip_frac`` counts the tokens whose weight was truncated."""
    mask = mask.bool()
    adv = token_advantages(advantages, logp)
    lr = log_ratio(logp, old_logp, mask)
    ratio = lr.detach().exp()
    weight = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    safe_logp = torch.where(mask, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    loss = aggregate(weighted(-weight * adv * safe_logp, weights), mask, agg, norm_length)
    with torch.no_grad():
        return loss, ratio_stats(ratio, lr.detach(), mask, ratio > 1.0 + clip_eps_high, ratio < 1.0 - clip_eps_low)


def sapo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, tau_pos: float = 1.0,
              tau_neg: float = 1.05, agg: AggMode = "seq-mean-token-mean", norm_length: int | None = None,
              weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO (Gao et al., arXiv 2511.20347, eq. 7–9): a smooth gate instead of a hard clip,

        f(ρ) = σ(τ·(ρ - 1)) · 4/τ,   loss_t = -f(ρ_t)·A_t,   τ = tau_pos if A_t > 0 else tau_neg,

    whose gradient is w·ρ·∇log π with w = 4σ(1 - σ): exactly 1 at ρ = 1 and decaying smoothly as
    the ratio leaves 1, faster for negative advantages (tau_neg > tau_pos; the paper: 1.0 and
    1.05). The reduction is the paper's per-sequence token mean. No token is hard-clipped, so
    ``clip_frac`` is 0; ``gate_weight_mean`` is the mean w."""
    mask = mask.bool()
    adv = token_advantages(advantages, logp)
    lr = log_ratio(logp, old_logp, mask)
    ratio = lr.exp()
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    loss = aggregate(weighted(-gate * (4.0 / tau) * adv, weights), mask, agg, norm_length)
    with torch.no_grad():
        none = torch.zeros_like(mask, dtype=torch.bool)
        stats = ratio_stats(ratio.detach(), lr.detach(), mask, none, none)
        g = gate.detach()
        stats["gate_weight_mean"] = (4 * g * (1 - g))[mask].float().mean() if mask.any() else torch.ones(())
        return loss, stats


def compute_policy_loss(name: PolicyLossName, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_eps_low: float, clip_eps_high: float, agg: AggMode, norm_length: int | None = None,
                        weights: Tensor | None = None, sapo_tau: tuple[float, float] = (1.0, 1.05)):
    """The named variant's loss and stats (``grpo`` is :func:`r1v3.rl.losses.policy_loss`)."""
    common = dict(agg=agg, norm_length=norm_length, weights=weights)
    clip = dict(clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
    if name == "grpo":
        return policy_loss(logp, old_logp, advantages, mask, **clip, **common)
    if name == "gspo":
        return gspo_loss(logp, old_logp, advantages, mask, **clip, **common)
    if name == "gspo-token":
        return gspo_token_loss(logp, old_logp, advantages, mask, **clip, **common)
    if name == "cispo":
        return cispo_loss(logp, old_logp, advantages, mask, **clip, **common)
    if name == "sapo":
        return sapo_loss(logp, old_logp, advantages, mask, tau_pos=sapo_tau[0], tau_neg=sapo_tau[1], **common)
    raise ValueError(f"unknown policy loss {name!r}; choose one of grpo, gspo, gspo-token, cispo, sapo")
