"""GRPO policy loss, its loss aggregations, and the k1/k2/k3 KL estimators.

Shapes: B sequences (rollouts) by T response positions; ``mask`` is true on real response tokens
and false on padding. Padding is dropped with ``torch.where`` everywhere, so whatever sits in a
padded position (garbage log-probs, inf, NaN) changes neither values nor gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from r1v3.rl.entropy import masked_mean

AggMode = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]

# exp() of a log-ratio beyond ±20 (a factor ~5e8) overflows soon after and no longer carries a
# useful signal; verl clamps at the same bound. Inside the bound values and gradients are exact.
LOG_RATIO_CLAMP = 20.0


def _zero_padding(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def weighted(per_token: Tensor, weights: Tensor | None) -> Tensor:
    """Per-token values times constant per-token weights (none: unchanged)."""
    return per_token if weights is None else per_token * weights.detach().to(per_token.dtype)


def token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Advantages as constants of ``like``'s dtype and shape [B, T]: one per sequence ([B]) is
    broadcast to its tokens, as GRPO does; per-token ones ([B, T]) pass through."""
    adv = advantages.detach().to(like.dtype)
    return (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(like)


def log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log(π/π_old) per token: 0 on padding (so exp never sees garbage), clamped to ±20."""
    return _zero_padding(logp - old_logp.detach(), mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: AggMode,
    norm_length: int | None = None,
) -> Tensor:
    """Reduce per-token values [B, T] to a scalar over the unmasked tokens.

    - ``"seq-mean-token-mean"``: mean over each sequence's tokens (1/|y_i|), then mean over
      sequences: the GRPO objective of DeepSeekMath (arXiv 2402.03300, eq. 3) and of Skywork-R1V3.
      Sequences with no unmasked token have no mean and are left out of the outer mean.
    - ``"token-mean"``: sum over all tokens / number of tokens, so long responses weigh in
      proportion to their length (DAPO's token-level loss, arXiv 2503.14476, §3.3).
    - ``"seq-mean-token-sum-norm"``: per-sequence token sum / a constant ``norm_length`` (default
      T), then mean over all B sequences, empty ones included: Dr.GRPO (arXiv 2503.20783, §3.1)
      removes the 1/|y_i| length bias by normalizing with a constant (the generation budget), and
      counting every row keeps the normalizer constant too.

    With no unmasked token at all the result is 0, still connected to ``values`` for autograd (so
    a rank whose micro-batch is all padding still joins the backward pass).
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    mask = mask.bool()
    masked = _zero_padding(values, mask)
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1).to(masked.dtype)
    seq_sum = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        n_tok = mask.sum(dim=-1)
        per_seq = seq_sum / n_tok.clamp(min=1).to(seq_sum.dtype)
        # Empty rows contribute 0 to the sum already; only the divisor has to skip them.
        return per_seq.sum() / (n_tok > 0).sum().clamp(min=1).to(per_seq.dtype)
    if mode == "seq-mean-token-sum-norm":
        norm = values.shape[-1] if norm_length is None else norm_length
        if norm <= 0:
            raise ValueError("norm_length must be positive")
        return (seq_sum / norm).mean()
    raise ValueError(f"unknown aggregation mode {mode!r}")


def micro_batch_share(micro_mask: Tensor, batch_mask: Tensor, mode: AggMode) -> float:
    """Weight of a micro-batch's own ``aggregate`` in the aggregate of the whole (mini-)batch.

    The loss of a batch cut into micro-batches is Σ share_m · aggregate(micro m), and it must not
    depend on the cut. Each share is the micro-batch's part of the batch's normaliser:
    - ``"token-mean"``: its unmasked tokens over the batch's;
    - ``"seq-mean-token-mean"``: its rows with at least one unmasked token over the batch's, since
      ``aggregate`` leaves empty rows (a masked truncation, say) out of the mean. Counting all rows
      instead made the gradient depend on the token budget that cut the micro-batches;
    - ``"seq-mean-token-sum-norm"``: its rows over the batch's, empty ones included.
    """
    if mode == "token-mean":
        return float(micro_mask.sum()) / max(float(batch_mask.sum()), 1.0)
    if mode == "seq-mean-token-mean":
        return float((micro_mask.sum(-1) > 0).sum()) / max(float((batch_mask.sum(-1) > 0).sum()), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return micro_mask.shape[0] / max(batch_mask.shape[0], 1)
    raise ValueError(f"unknown aggregation mode {mode!r}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    agg: AggMode = "seq-mean-token-mean",
    norm_length: int | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate loss and detached statistics.

    Per token, with ρ = exp(logp - old_logp):
        loss_t = -min(ρ·A, clip(ρ, 1 - eps_low, 1 + eps_high)·A)
    (PPO's objective as used by GRPO, DeepSeekMath arXiv 2402.03300 eq. 3; separate ``eps_low``
    and ``eps_high`` are DAPO's "clip-higher", arXiv 2503.14476 §3.1), reduced by ``aggregate``.

    ``advantages`` is [B] (one value per sequence, broadcast to its tokens, as GRPO does) or
    [B, T]. ``old_logp`` and ``advantages`` are treated as constants. The log-ratio is clamped to
    ±20 before exp (see ``LOG_RATIO_CLAMP``); a token beyond it gets no gradient. ``weights``
    [B, T], constant, multiply each token's loss before the reduction: the rollout correction's
    importance weights and the entropy controls' token selections (:mod:`r1v3.rl.objective`).

    On-policy (old_logp = logp.detach(), the paper's single update per rollout batch), ρ = 1 with
    ∇ρ = ∇logp, so clipping cannot bind, the loss value is -aggregate(A) and the gradient is the
    vanilla policy gradient -aggregate(A·∇logp).

    Stats, over unmasked tokens, detached:
    - ``clip_frac``: share of tokens where the clipped term is the strict minimum (clipping
      binds, the token gets no gradient): ρ > 1 + eps_high with A > 0, or ρ < 1 - eps_low with
      A < 0. ``clip_frac_high`` / ``clip_frac_low`` split it by side.
    - ``ratio_mean``, ``ratio_min``, ``ratio_max`` of ρ (1.0 when there is no token).
    - ``approx_kl_old``: Schulman's k3 for KL(π_old‖πθ), the direction the rollout samples
      (drawn from π_old) can estimate without bias: mean(ρ - 1 - log ρ) ≥ 0.
    """
    if logp.shape != mask.shape or old_logp.shape != mask.shape:
        raise ValueError("logp, old_logp and mask must share the shape [B, T]")
    mask = mask.bool()
    adv = token_advantages(advantages, logp)
    lr = log_ratio(logp, old_logp, mask)
    ratio = lr.exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate(weighted(per_token, weights), mask, agg, norm_length)

    with torch.no_grad():
        high = (ratio > 1.0 + clip_eps_high) & (adv > 0)
        low = (ratio < 1.0 - clip_eps_low) & (adv < 0)
        stats = ratio_stats(ratio, lr, mask, high, low)
    return loss, stats


@torch.no_grad()
def ratio_stats(ratio: Tensor, lr: Tensor, mask: Tensor, high: Tensor, low: Tensor) -> dict[str, Tensor]:
    """The clipping and ratio statistics every policy loss reports, over the unmasked tokens.

    ``high``/``low`` mark where the loss's clip binds on each side (the token gets no gradient
    there, or, for CISPO, a truncated weight)."""
    mask = mask.bool()
    high, low, f32 = high & mask, low & mask, ratio.float()
    one = torch.ones((), device=ratio.device)
    return {
        "clip_frac": masked_mean((high | low).float(), mask),
        "clip_frac_high": masked_mean(high.float(), mask),
        "clip_frac_low": masked_mean(low.float(), mask),
        "ratio_mean": masked_mean(f32, mask) if mask.any() else one,
        "ratio_min": f32[mask].min() if mask.any() else one,
        "ratio_max": f32[mask].max() if mask.any() else one,
        "approx_kl_old": masked_mean(f32 - 1.0 - lr.float(), mask),
    }


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind) -> Tensor:
    """Per-token KL estimator between the policy πθ and the reference πref, same shape as logp.

    Schulman, "Approximating KL divergence" (2020). With tokens sampled from πθ and the log-ratio
    lr = log πref(y) - log πθ(y):
        k1 = -lr,   k2 = lr² / 2,   k3 = exp(lr) - 1 - lr.

    Value: all three estimate the reverse KL(πθ‖πref) when averaged over samples from πθ. k1 is
    unbiased but can be negative per token; k2 is biased (slightly) but ≥ 0 with low variance; k3
    is unbiased and ≥ 0.

    Gradient, when used as a loss term on a fixed on-policy batch (autograd differentiates through
    logp only, never through the sampling), taking E over y ~ πθ:
    - k1: ∇k1 = ∇log πθ(y), and E[∇log πθ] = 0, so k1 adds no gradient in expectation: as a loss
      term it is useless, and it belongs in the reward (``sequence_kl``), where the score-function
      estimator turns it into the reverse-KL gradient.
    - k2: ∇k2 = (log πθ - log πref)(y)·∇log πθ(y), whose expectation is exactly ∇KL(πθ‖πref): the
      reverse-KL gradient.
    - k3: ∇k3 = (1 - πref/πθ)(y)·∇log πθ(y), expectation Σ_y (πθ - πref)∇log πθ = ∇KL(πref‖πθ):
      the forward-KL gradient, not the reverse. This is the loss term of the original GRPO
      (DeepSeekMath, arXiv 2402.03300, eq. 4).

    ``ref_logp`` is detached (the reference model is frozen). For k3 ``lr`` is clamped to ±20
    before exp, so a token the reference finds far likelier than the policy gives a large but
    finite penalty (exp(20) ≈ 5e8) instead of inf; beyond the clamp that token has no gradient.
    k1 and k2 need no exp and are left unclamped.
    """
    lr = ref_logp.detach() - logp
    if kind == "k1":
        return -lr
    if kind == "k2":
        return 0.5 * lr.square()
    if kind == "k3":
        lr = lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return lr.exp() - 1.0 - lr
    raise ValueError(f"unknown KL estimator {kind!r}")


def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-sequence KL [B]: sum of ``kl_penalty`` over the unmasked tokens of each row.

    For KL in the reward: the caller subtracts β·sequence_kl from each sample's reward before the
    group advantages (the log-ratio of a whole sequence is the sum of its tokens' log-ratios, so
    the sum, not the mean, is the sequence-level k1). Pass detached log-probs there, since a reward
    carries no gradient.
    """
    mask = mask.bool()
    return _zero_padding(kl_penalty(logp, ref_logp, kind), mask).sum(dim=-1)
