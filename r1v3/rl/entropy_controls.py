"""Entropy controls for the policy update: which tokens learn, and a bonus that keeps entropy up.

Skywork-R1V3's checkpoint signal is entropy; these are the controls that followed it:

- **High-entropy tokens only** (Wang et al., "Beyond the 80/20 rule", arXiv 2506.01939): the
  policy gradient goes through the top-q share of tokens by entropy (q = 0.2 in the paper), the
  "forking" tokens; the rest get no gradient.
- **Entropy bonus** (Skywork-OR1, arXiv 2505.22312, §3.2.5 adaptive entropy control): the loss
  subtracts α·H. With a target entropy, α follows the entropy: the coefficient c rises by Δ while
  the entropy is below the target and falls by Δ above it (never below 0), and the bonus applies
  only while the entropy is at or below the target: α = c·[H ≤ target]. The paper: target 0.2,
  Δ = 0.005.
- **Clip-Cov and KL-Cov** (Cui et al., "The entropy mechanism of RL for reasoning LMs", arXiv
  2505.22617, §5): the tokens whose covariance between log-prob and advantage is largest drive the
  entropy down. Clip-Cov cuts the gradient of a random r share of the tokens whose covariance lies
  in [lo, hi] (r = 2e-4, [1, 5]); KL-Cov adds β·|log π - log π_old| to the top-k share by
  covariance (k = 2e-3, β = 1). KL-Cov's penalty has no gradient at ratio 1, so it acts only
  off-policy.

Every selection is over the tokens of one micro-batch, as in the papers' code, where the loss is
computed per micro-batch too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from r1v3.rl.losses import token_advantages


@dataclass
class EntropyControl:
    """Entropy controls of the GRPO update (all off by default: the paper's GRPO).

    Args:
        top_q: Share of tokens, by entropy, that get the policy gradient (1 = all; the 80/20
            paper: 0.2).
        bonus_coef: α of the entropy bonus (the loss subtracts α·H); with ``target`` the initial
            coefficient c.
        target: Target entropy for the adaptive coefficient (Skywork-OR1: 0.2); None keeps α fixed.
        target_step: Δ, the coefficient's change per step (Skywork-OR1: 0.005).
        cov: ``clip`` (Clip-Cov), ``kl`` (KL-Cov) or ``none``.
        clip_cov_ratio: Share of tokens whose gradient Clip-Cov cuts (2e-4).
        clip_cov_bounds: Covariance range Clip-Cov draws them from ([1, 5]).
        kl_cov_ratio: Share of tokens, top by covariance, that get KL-Cov's penalty (2e-3).
        kl_cov_coef: β of KL-Cov's penalty (1).
    """

    top_q: float = 1.0
    bonus_coef: float = 0.0
    target: float | None = None
    target_step: float = 0.005
    cov: Literal["none", "clip", "kl"] = "none"
    clip_cov_ratio: float = 2e-4
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0)
    kl_cov_ratio: float = 2e-3
    kl_cov_coef: float = 1.0


# Lightning checkpoints keep the stage's hyperparameters; torch.load(weights_only=True) needs the class.
torch.serialization.add_safe_globals([EntropyControl])

def high_entropy_tokens(entropy: Tensor, mask: Tensor, top_q: float) -> Tensor:
    """Bool [B, T]: the unmasked tokens whose entropy is in the top ``top_q`` share (at least one
    token when there is any; ties at the threshold are all kept)."""
    mask = mask.bool()
    if top_q >= 1.0 or not mask.any():
        return mask
    if top_q <= 0:
        raise ValueError(f"top_q must be in (0, 1], got {top_q}")
    values = entropy.detach().float()[mask]
    k = max(1, int(round(top_q * values.numel())))
    threshold = values.topk(k).values.min()
    return mask & (entropy.detach().float() >= threshold)


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """[B, T] (log π_t - mean log π)·(A_t - mean A) over the unmasked tokens (0 elsewhere): each
    token's term of the covariance that drives the entropy change (arXiv 2505.22617, eq. 11)."""
    mask = mask.bool()
    lp = logp.detach().float()
    adv = token_advantages(advantages, lp)
    if not mask.any():
        return torch.zeros_like(lp)
    cov = (lp - lp[mask].mean()) * (adv - adv[mask].mean())
    return torch.where(mask, cov, torch.zeros_like(cov))


def clip_cov_tokens(logp: Tensor, advantages: Tensor, mask: Tensor, ratio: float, bounds: tuple[float, float],
                    clipped: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Bool [B, T]: Clip-Cov's tokens, whose gradient is cut. max(1, ⌊ratio·N⌋) tokens drawn at
    random among the unmasked ones with covariance in (lo, hi) that the loss's own clip has not
    already cut (``clipped``); fewer when fewer qualify."""
    mask = mask.bool()
    cov = token_covariance(logp, advantages, mask)
    lo, hi = bounds
    candidates = mask & (cov > lo) & (cov < hi)
    if clipped is not None:
        candidates &= ~clipped.bool()
    picked = torch.zeros_like(mask)
    where = candidates.flatten().nonzero().squeeze(-1)
    if len(where):
        n = min(len(where), max(1, int(ratio * int(mask.sum()))))
        order = torch.randperm(len(where), generator=generator)[:n]
        picked.view(-1)[where[order.to(where.device)]] = True
    return picked


def kl_cov_tokens(logp: Tensor, advantages: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """Bool [B, T]: KL-Cov's tokens, the top max(1, ⌊ratio·N⌋) unmasked ones by covariance."""
    mask = mask.bool()
    picked = torch.zeros_like(mask)
    n_tok = int(mask.sum())
    if not n_tok:
        return picked
    cov = token_covariance(logp, advantages, mask).masked_fill(~mask, float("-inf"))
    top = cov.flatten().topk(max(1, int(ratio * n_tok))).indices
    picked.view(-1)[top] = True
    return picked


def next_entropy_coef(coef: float, entropy: float, target: float, step: float) -> float:
    """Skywork-OR1's coefficient update: c + Δ below the target, c - Δ above it, never below 0."""
    if entropy < target:
        return coef + step
    if entropy > target:
        return max(0.0, coef - step)
    return coef


def applied_entropy_coef(coef: float, entropy: float | None, target: float | None) -> float:
    """α for this step: the fixed coefficient without a target; with one, c while the entropy is
    at or below the target and 0 above it (before the first measurement: 0)."""
    if target is None:
        return coef
    if entropy is None:
        return 0.0
    return coef if entropy <= target else 0.0
