"""Rollout correction: importance weights for the gap between the rollout engine and the trainer.

The engine samples from π_engine; the trainer computes its loss under π_old, its own log-probs of
the same tokens before the update. The two differ when the engine runs in another precision or
with other kernels (bf16 vLLM against a float32 policy, say), which makes even the "on-policy"
update off-policy. Yao et al. ("Your efficient RL framework secretly brings you off-policy RL
training", 2025) correct it with the ratio r_t = π_old(y_t) / π_engine(y_t):

- **TIS**, truncated importance sampling: each token's loss is multiplied by min(r_t, C);
- **MIS**, masked importance sampling at sequence level (Liu et al., "When speed kills
  stability", 2025): a sequence whose ratio Π_t r_t (``sequence``) or its per-token geometric mean
  (``geometric``) leaves [lo, hi] is dropped from the loss.

Both engines report the log-probs of the distribution they sampled from (after temperature, with
the banned tokens out; :func:`r1v3.logprobs.sampling_logits`), which is what the trainer scores,
so r_t compares like with like. docs/algorithms.md gives the measured gaps behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from r1v3.rl.losses import log_ratio


@dataclass
class RolloutCorrection:
    """Importance weights between the rollout engine's sampling log-probs and the trainer's.

    Args:
        mode: ``auto`` picks from the measured gap: off where both sides compute in float32 (the
            HF engine under a float32 policy; vLLM and policy both float32), ``tis`` where either
            runs bf16 (the HF engine's cached generation then differs from the full forward too);
            or ``off``, ``tis``, ``mis``, ``tis+mis`` explicitly.
        tis_cap: C, the largest token weight (Yao et al. use 2).
        mis_bounds: (lo, hi): sequences whose ratio leaves this range are masked.
        mis_level: ``sequence`` (product of the token ratios) or ``geometric`` (its per-token
            geometric mean, which does not grow with the length).
    """

    mode: Literal["auto", "off", "tis", "mis", "tis+mis"] = "auto"
    tis_cap: float = 2.0
    mis_bounds: tuple[float, float] = (0.5, 2.0)
    mis_level: Literal["sequence", "geometric"] = "sequence"

    def resolve(self, engine: str, engine_dtype: str, policy_dtype: str) -> str:
        """The mode to run: ``auto`` resolved for this engine and these precisions."""
        if self.mode != "auto":
            return self.mode
        if engine == "hf":  # generates with the policy itself, in its precision
            engine_dtype = policy_dtype
        return "off" if engine_dtype == policy_dtype == "float32" else "tis"


# Lightning checkpoints keep the stage's hyperparameters; torch.load(weights_only=True) needs the class.
torch.serialization.add_safe_globals([RolloutCorrection])

def _log_ratio(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> Tensor:
    """log(π_old/π_engine) per token in float32, 0 on padding, clamped as the losses clamp theirs."""
    return log_ratio(old_logp.detach().float(), engine_logp.float(), mask)


def correction_weights(old_logp: Tensor, engine_logp: Tensor, mask: Tensor, mode: str, tis_cap: float = 2.0,
                       mis_bounds: tuple[float, float] = (0.5, 2.0),
                       mis_level: str = "sequence") -> tuple[Tensor | None, Tensor]:
    """Per-token loss weights [B, T] (None when ``mode`` is ``off``) and the rows MIS keeps [B].

    The weights are constants: min(r_t, C) under TIS, 1 otherwise, and 0 on every token of a
    masked sequence."""
    mask = mask.bool()
    keep = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    if mode == "off":
        return None, keep
    if mode not in ("tis", "mis", "tis+mis"):
        raise ValueError(f"unknown rollout correction {mode!r}")
    lr = _log_ratio(old_logp, engine_logp, mask)
    weights = lr.exp().clamp(max=tis_cap) if "tis" in mode else torch.ones_like(lr)
    if "mis" in mode:
        keep = sequence_in_bounds(lr, mask, mis_bounds, mis_level)
    return weights * keep[:, None] * mask, keep


def sequence_in_bounds(lr: Tensor, mask: Tensor, bounds: tuple[float, float], level: str) -> Tensor:
    seq = lr.sum(-1)
    if level == "geometric":
        seq = seq / mask.sum(-1).clamp(min=1)
    elif level != "sequence":
        raise ValueError(f"unknown MIS level {level!r}")
    lo, hi = bounds
    return (seq >= torch.log(torch.tensor(lo))) & (seq <= torch.log(torch.tensor(hi)))


@torch.no_grad()
def mismatch_metrics(old_logp: Tensor, engine_logp: Tensor, mask: Tensor, has_image: Tensor, tis_cap: float = 2.0,
                     mis_bounds: tuple[float, float] = (0.5, 2.0), mis_level: str = "sequence") -> dict[str, float]:
    """How far the engine's sampling distribution is from the trainer's on the step's tokens,
    whatever the correction mode (so a run without one still sees it):

    - ``mismatch_kl``: k3 estimate of KL(π_engine‖π_old) from the engine's own samples,
      mean over tokens of r - 1 - log r (Schulman's k3; 0 when the two agree);
    - ``is_weight_mean`` / ``is_weight_max``: r_t before truncation;
    - ``tis_clipped_frac``: share of tokens with r_t > C;
    - ``mis_masked_frac``: share of sequences outside the MIS bounds.

    Each also for the rows whose prompt has an image (``_image``) and those without (``_text``),
    when there are any."""
    mask = mask.bool()
    lr = _log_ratio(old_logp, engine_logp, mask)
    r = lr.exp()
    outside = ~sequence_in_bounds(lr, mask, mis_bounds, mis_level) & mask.any(-1)
    out: dict[str, float] = {}
    for suffix, rows in (("", torch.ones_like(has_image, dtype=torch.bool)), ("_image", has_image.bool()),
                         ("_text", ~has_image.bool())):
        m = mask & rows[:, None]
        if not m.any():
            continue
        out[f"mismatch_kl{suffix}"] = float((r - 1 - lr)[m].mean())
        out[f"is_weight_mean{suffix}"] = float(r[m].mean())
        out[f"is_weight_max{suffix}"] = float(r[m].max())
        out[f"tis_clipped_frac{suffix}"] = float((r[m] > tis_cap).float().mean())
        out[f"mis_masked_frac{suffix}"] = float(outside[rows & mask.any(-1)].float().mean())
    return out
