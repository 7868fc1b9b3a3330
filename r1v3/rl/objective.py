"""The GRPO stage's loss for one micro-batch: a policy-loss variant, the rollout correction's
weights, the entropy controls and the KL terms, composed in one place.

Order, per micro-batch:
1. rollout-correction weights from the engine's sampling log-probs (:mod:`r1v3.rl.correction`);
2. token selections of the entropy controls (:mod:`r1v3.rl.entropy_controls`): top-q by entropy,
   Clip-Cov's cut tokens; both multiply the weights by 0 or 1;
3. the named policy loss with those weights (:mod:`r1v3.rl.policy_losses`);
4. additive terms: KL-Cov's penalty, the entropy bonus, β·KL to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from r1v3.rl.correction import RolloutCorrection, correction_weights
from r1v3.rl.entropy_controls import EntropyControl, clip_cov_tokens, high_entropy_tokens, kl_cov_tokens
from r1v3.rl.entropy import masked_mean
from r1v3.rl.losses import AggMode, aggregate, kl_penalty, log_ratio, token_advantages
from r1v3.rl.policy_losses import PolicyLossName, compute_policy_loss


@dataclass
class LossSpec:
    """Everything the update's loss is built from, fixed for a run (the stage fills it from its
    arguments); ``correction_mode`` is the correction's resolved mode."""

    name: PolicyLossName = "grpo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    agg: AggMode = "seq-mean-token-mean"
    norm_length: int | None = None
    sapo_tau: tuple[float, float] = (1.0, 1.05)
    correction: RolloutCorrection = field(default_factory=RolloutCorrection)
    correction_mode: str = "off"
    entropy: EntropyControl = field(default_factory=EntropyControl)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


def micro_batch_loss(spec: LossSpec, logp: Tensor, old_logp: Tensor, engine_logp: Tensor, advantages: Tensor,
                     mask: Tensor, entropy: Tensor | None = None, entropy_coef: float = 0.0,
                     ref_logp: Tensor | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one micro-batch (before its share of the mini-batch) and its statistics.

    ``entropy`` [B, T] is the policy's entropy at each position; it must carry gradients when
    ``entropy_coef`` > 0 (the bonus differentiates it). ``engine_logp`` are the engine's sampling
    log-probs of the same tokens."""
    mask = mask.bool()
    control, corr = spec.entropy, spec.correction
    weights, _ = correction_weights(old_logp, engine_logp, mask, spec.correction_mode, corr.tis_cap,
                                    corr.mis_bounds, corr.mis_level)
    stats: dict[str, Tensor] = {}
    if control.top_q < 1.0:
        if entropy is None:
            raise ValueError("top_q needs the policy's entropy")
        selected = high_entropy_tokens(entropy, mask, control.top_q)
        weights = selected.float() if weights is None else weights * selected
        stats["entropy_selected_frac"] = masked_mean(selected.float(), mask)
    if control.cov == "clip":
        adv = token_advantages(advantages, logp)
        ratio = log_ratio(logp.detach(), old_logp, mask).exp()
        clipped = ((ratio > 1 + spec.clip_eps_high) & (adv > 0)) | ((ratio < 1 - spec.clip_eps_low) & (adv < 0))
        cut = clip_cov_tokens(logp, advantages, mask, control.clip_cov_ratio, control.clip_cov_bounds, clipped,
                              generator)
        weights = (~cut).float() if weights is None else weights * ~cut
        stats["clip_cov_frac"] = masked_mean(cut.float(), mask)
    loss, st = compute_policy_loss(spec.name, logp, old_logp, advantages, mask, clip_eps_low=spec.clip_eps_low,
                                   clip_eps_high=spec.clip_eps_high, agg=spec.agg, norm_length=spec.norm_length,
                                   weights=weights, sapo_tau=spec.sapo_tau)
    stats.update(st)
    if control.cov == "kl":
        chosen = kl_cov_tokens(logp, advantages, mask, control.kl_cov_ratio)
        penalty = (logp - old_logp.detach()).abs() * chosen
        loss = loss + control.kl_cov_coef * aggregate(penalty, mask, spec.agg, spec.norm_length)
        stats["kl_cov_frac"] = masked_mean(chosen.float(), mask)
    if entropy_coef > 0:
        if entropy is None or not entropy.requires_grad:
            raise ValueError("the entropy bonus needs the policy's entropy with gradients")
        loss = loss - entropy_coef * aggregate(entropy, mask, spec.agg, spec.norm_length)
    if ref_logp is not None and spec.kl_coef > 0:
        kl = kl_penalty(logp, ref_logp, spec.kl_estimator)
        loss = loss + spec.kl_coef * aggregate(kl, mask, spec.agg, spec.norm_length)
    return loss, stats
