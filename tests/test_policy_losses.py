"""Policy-loss variants, rollout correction and entropy controls against their papers' formulas.

The hand-made example: 2 groups × 4 samples with uneven lengths. Each reference below is the
paper's formula written out token by token in plain Python floats, independent of the tensor code.
"""

import math

import pytest
import torch

from r1v3.rl.advantages import soft_overlong_penalty
from r1v3.rl.correction import RolloutCorrection, correction_weights, mismatch_metrics
from r1v3.rl.entropy_controls import (applied_entropy_coef, clip_cov_tokens, high_entropy_tokens, kl_cov_tokens,
                                      next_entropy_coef, token_covariance)
from r1v3.rl.losses import policy_loss
from r1v3.rl.objective import LossSpec, micro_batch_loss
from r1v3.rl.policy_losses import cispo_loss, compute_policy_loss, gspo_loss, gspo_token_loss, sapo_loss

LENGTHS = [3, 2, 1, 3, 2, 3, 1, 2]  # group 1: rows 0-3, group 2: rows 4-7
ADV = [1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.0, 0.8]
# log π_old and the log-ratio log(π/π_old) of each real token; padding holds garbage on purpose
OLD = [[-1.0, -0.5, -2.0], [-0.3, -1.2], [-0.7], [-1.5, -0.2, -0.9], [-0.4, -2.2], [-1.1, -0.6, -0.8], [-0.9],
       [-1.3, -0.5]]
LR = [[0.10, -0.05, 0.20], [-0.30, 0.02], [0.50], [0.01, -0.40, 0.05], [0.15, 0.12], [-0.25, -0.10, 0.30],
      [0.05], [0.40, 0.35]]


def tensors(requires_grad=False):
    T = max(LENGTHS)
    old = torch.full((8, T), 7.0, dtype=torch.float64)  # garbage in the padding
    logp = torch.full((8, T), float("nan"), dtype=torch.float64)
    mask = torch.zeros(8, T, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = True
        old[i, :n] = torch.tensor(OLD[i], dtype=torch.float64)
        logp[i, :n] = torch.tensor(OLD[i], dtype=torch.float64) + torch.tensor(LR[i], dtype=torch.float64)
    return logp.requires_grad_(requires_grad), old, torch.tensor(ADV, dtype=torch.float64), mask


def clip(x, lo, hi):
    return min(max(x, lo), hi)


# -- values against the formulas, written out ---------------------------------------------------------
def test_gspo_value_is_the_mean_over_sequences_of_the_clipped_sequence_objective():
    lo, hi = 0.1, 0.15  # wide enough that some sequences clip and some do not
    per_seq = []
    for lr, a in zip(LR, ADV):
        s = math.exp(sum(lr) / len(lr))  # (π/π_old)^(1/|y|)
        per_seq.append(-min(s * a, clip(s, 1 - lo, 1 + hi) * a))
    expected = sum(per_seq) / 8
    logp, old, adv, mask = tensors()
    loss, st = gspo_loss(logp, old, adv, mask, lo, hi)
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    clipped_rows = [i for i, (lr, a) in enumerate(zip(LR, ADV))
                    if (math.exp(sum(lr) / len(lr)) > 1 + hi and a > 0) or (math.exp(sum(lr) / len(lr)) < 1 - lo and a < 0)]
    assert clipped_rows  # the example exercises the clip
    assert float(st["clip_frac"]) == pytest.approx(sum(LENGTHS[i] for i in clipped_rows) / sum(LENGTHS))


def test_gspo_token_equals_gspo_with_one_advantage_per_sequence():
    logp, old, adv, mask = tensors(requires_grad=True)
    a, _ = gspo_loss(logp, old, adv, mask, 0.1, 0.15)
    (ga,) = torch.autograd.grad(a, logp)
    b, _ = gspo_token_loss(logp, old, adv, mask, 0.1, 0.15)
    (gb,) = torch.autograd.grad(b, logp)
    assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-12)
    assert torch.allclose(ga[mask], gb[mask], atol=1e-12)


def test_cispo_value_is_the_token_mean_of_the_truncated_weight_times_advantage_times_logp():
    lo, hi = 1.0, 0.28  # no lower bound, as in MiniMax-M1
    total, n = 0.0, 0
    for old_row, lr_row, a in zip(OLD, LR, ADV):
        for o, lr in zip(old_row, lr_row):
            w = clip(math.exp(lr), 1 - lo, 1 + hi)
            total += -w * a * (o + lr)
            n += 1
    logp, old, adv, mask = tensors()
    loss, st = cispo_loss(logp, old, adv, mask, lo, hi, agg="token-mean")
    assert float(loss) == pytest.approx(total / n, abs=1e-12)
    truncated = sum(math.exp(lr) > 1 + hi for row in LR for lr in row)
    assert truncated and float(st["clip_frac"]) == pytest.approx(truncated / n)


def test_sapo_value_is_the_sequence_mean_of_the_gated_advantage():
    tau_pos, tau_neg = 1.0, 1.05
    per_seq = []
    for lr_row, a in zip(LR, ADV):
        tau = tau_pos if a > 0 else tau_neg
        gate = [4 / tau / (1 + math.exp(-tau * (math.exp(lr) - 1))) for lr in lr_row]
        per_seq.append(sum(-g * a for g in gate) / len(lr_row))
    logp, old, adv, mask = tensors()
    loss, _ = sapo_loss(logp, old, adv, mask, tau_pos, tau_neg)
    assert float(loss) == pytest.approx(sum(per_seq) / 8, abs=1e-12)


# -- stop-gradients -----------------------------------------------------------------------------------
def test_cispo_weight_receives_no_gradient():
    logp, old, adv, mask = tensors(requires_grad=True)
    loss, _ = cispo_loss(logp, old, adv, mask, 1.0, 0.28, agg="token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    n = sum(LENGTHS)
    for i, (lr_row, a) in enumerate(zip(LR, ADV)):
        for t, lr in enumerate(lr_row):  # d/dlogp of -sg[w]·A·logp / N is -w·A/N: nothing through w
            assert float(grad[i, t]) == pytest.approx(-clip(math.exp(lr), 0.0, 1.28) * a / n, abs=1e-12)
    assert (grad[~mask] == 0).all()


def test_gspo_token_sequence_factor_receives_no_gradient():
    logp, old, adv, mask = tensors(requires_grad=True)
    lo = hi = 10.0  # no clipping: every token keeps its gradient
    loss, _ = gspo_token_loss(logp, old, adv, mask, lo, hi)
    (grad,) = torch.autograd.grad(loss, logp)
    for i, (lr_row, a) in enumerate(zip(LR, ADV)):
        s = math.exp(sum(lr_row) / len(lr_row))
        for t in range(len(lr_row)):  # ∇ of -sg[s]·exp(logp - sg[logp])·A, seq-mean-token-mean: -s·A/|y|/B
            assert float(grad[i, t]) == pytest.approx(-s * a / len(lr_row) / 8, abs=1e-12)


# -- on-policy equivalences ---------------------------------------------------------------------------
def on_policy_grad(fn, agg, **kwargs):
    logp, _, adv, mask = tensors(requires_grad=True)
    loss, _ = fn(logp, logp.detach(), adv, mask, agg=agg, **kwargs)
    (grad,) = torch.autograd.grad(loss, logp)
    return grad[mask]


def test_on_policy_gspo_gradient_equals_sequence_mean_grpo():
    grpo = on_policy_grad(policy_loss, "seq-mean-token-mean")
    assert torch.allclose(on_policy_grad(gspo_loss, "seq-mean-token-mean"), grpo, atol=1e-12)
    assert torch.allclose(on_policy_grad(gspo_token_loss, "seq-mean-token-mean"), grpo, atol=1e-12)
    assert torch.allclose(on_policy_grad(sapo_loss, "seq-mean-token-mean"), grpo, atol=1e-12)


def test_on_policy_cispo_gradient_equals_token_mean_grpo():
    grpo = on_policy_grad(policy_loss, "token-mean")
    assert torch.allclose(on_policy_grad(cispo_loss, "token-mean"), grpo, atol=1e-12)


def test_off_policy_the_variants_differ():
    logp, old, adv, mask = tensors(requires_grad=True)
    grads = []
    for name in ("grpo", "gspo", "cispo", "sapo"):
        loss, _ = compute_policy_loss(name, logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2,
                                      agg="seq-mean-token-mean")
        grads.append(torch.autograd.grad(loss, logp)[0][mask])
    for i in range(len(grads)):
        for j in range(i + 1, len(grads)):
            assert not torch.allclose(grads[i], grads[j], atol=1e-6)


# -- rollout correction -------------------------------------------------------------------------------
def test_tis_clips_mis_masks_and_the_metrics_report_the_injected_gap():
    _, old, _, mask = tensors()
    delta = torch.zeros_like(old)
    delta[0, :3] = math.log(3.0)  # engine 3× less likely than the trainer: r = 3, above C = 2
    delta[4, :2] = -0.1  # r = e^-0.1, inside everything
    engine = old - delta
    weights, keep = correction_weights(old, engine, mask, "tis", tis_cap=2.0)
    assert torch.allclose(weights[0, :3], torch.full((3,), 2.0, dtype=weights.dtype))  # clipped at C
    assert torch.allclose(weights[4, :2].double(), torch.full((2,), math.exp(-0.1), dtype=torch.float64))
    assert keep.all() and (weights[~mask] == 0).all()
    weights, keep = correction_weights(old, engine, mask, "mis", mis_bounds=(0.5, 2.0))
    assert keep.tolist() == [False] + [True] * 7  # row 0's ratio 27 leaves [0.5, 2]
    assert (weights[0] == 0).all() and (weights[1:][mask[1:]] == 1).all()

    has_image = torch.tensor([True] * 4 + [False] * 4)
    m = mismatch_metrics(old, engine, mask, has_image, tis_cap=2.0, mis_bounds=(0.5, 2.0))
    n = sum(LENGTHS)
    k3 = lambda d: math.exp(d) - 1 - d  # noqa: E731
    assert m["mismatch_kl"] == pytest.approx((3 * k3(math.log(3.0)) + 2 * k3(-0.1)) / n, rel=1e-5)
    assert m["mismatch_kl_image"] == pytest.approx(3 * k3(math.log(3.0)) / sum(LENGTHS[:4]), rel=1e-5)
    assert m["mismatch_kl_text"] == pytest.approx(2 * k3(-0.1) / sum(LENGTHS[4:]), rel=1e-5)
    assert m["is_weight_max"] == pytest.approx(3.0, rel=1e-5)
    assert m["tis_clipped_frac"] == pytest.approx(3 / n)
    assert m["mis_masked_frac"] == pytest.approx(1 / 8) and m["mis_masked_frac_text"] == 0.0
    clean = mismatch_metrics(old, old, mask, has_image)
    assert clean["mismatch_kl"] == 0.0 and clean["is_weight_max"] == 1.0


def test_auto_correction_follows_the_engine_and_precision():
    auto = RolloutCorrection()
    assert auto.resolve("hf", "float32", "float32") == "off"
    assert auto.resolve("hf", "float32", "bfloat16") == "tis"  # bf16 autocast: cached generate ≠ full forward
    assert auto.resolve("vllm", "float32", "float32") == "off"
    assert auto.resolve("vllm", "bfloat16", "float32") == "tis"
    assert auto.resolve("vllm", "float32", "bfloat16") == "tis"
    assert RolloutCorrection(mode="mis").resolve("hf", "float32", "float32") == "mis"


def test_tis_weights_scale_each_token_of_the_loss():
    logp, old, adv, mask = tensors(requires_grad=True)
    engine = old.clone()
    engine[1, :2] -= math.log(1.5)  # r = 1.5 on row 1
    spec = LossSpec(correction_mode="tis", agg="token-mean")
    loss, _ = micro_batch_loss(spec, logp, logp.detach(), engine, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    plain, _ = policy_loss(logp, logp.detach(), adv, mask, agg="token-mean")
    (plain_grad,) = torch.autograd.grad(plain, logp)
    # π_old is the trainer's: its ratio to the engine is r·(π_old/old) — here logp differs from
    # old by LR, so the weight is exp(LR + log 1.5 on row 1) capped at 2
    w = torch.where(mask, (logp.detach() - engine).exp().clamp(max=2.0), torch.zeros_like(logp))
    assert torch.allclose(grad[mask], (plain_grad * w)[mask], atol=1e-12)


# -- entropy controls ---------------------------------------------------------------------------------
def test_high_entropy_tokens_keep_the_top_share():
    entropy = torch.tensor([[0.1, 2.0, 0.5, 9.0], [1.5, 0.2, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    picked = high_entropy_tokens(entropy, mask, 0.3)  # 7 tokens → the top 2: 3.0 and 2.0
    assert picked.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert high_entropy_tokens(entropy, mask, 1.0).equal(mask)


def test_covariance_selections():
    logp = torch.tensor([[-0.1, -3.0, -0.2], [-2.0, -0.5, -4.0]])
    adv = torch.tensor([2.0, -2.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    cov = token_covariance(logp, adv, mask)
    mean_lp = float(logp.mean())
    assert float(cov[0, 0]) == pytest.approx((-0.1 - mean_lp) * 2.0)
    assert float(cov[1, 2]) == pytest.approx((-4.0 - mean_lp) * -2.0)
    top = kl_cov_tokens(logp, adv, mask, ratio=0.2)  # max(1, ⌊0.2·6⌋) = 1 token: the largest covariance
    assert int(top.sum()) == 1 and bool(top.flatten()[cov.flatten().argmax()])
    g = torch.Generator().manual_seed(0)
    cut = clip_cov_tokens(logp, adv, mask, ratio=0.5, bounds=(1.0, 5.0), generator=g)
    inside = (cov > 1.0) & (cov < 5.0)
    assert int(cut.sum()) == min(3, int(inside.sum())) and not (cut & ~inside).any()


def test_adaptive_entropy_coefficient_follows_skywork_or1():
    assert next_entropy_coef(0.0, 0.1, 0.2, 0.005) == pytest.approx(0.005)  # below target: up
    assert next_entropy_coef(0.01, 0.3, 0.2, 0.005) == pytest.approx(0.005)  # above: down
    assert next_entropy_coef(0.002, 0.3, 0.2, 0.005) == 0.0  # never below 0
    assert applied_entropy_coef(0.01, 0.3, 0.2) == 0.0  # above target: no bonus
    assert applied_entropy_coef(0.01, 0.1, 0.2) == 0.01
    assert applied_entropy_coef(0.01, None, None) == 0.01  # fixed coefficient


def test_entropy_bonus_pushes_entropy_up():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ids = torch.zeros(2, 3, dtype=torch.long)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.zeros(2)  # no policy gradient: only the bonus acts
    loss, _ = micro_batch_loss(LossSpec(), logp, logp.detach(), logp.detach(), adv, mask, entropy, 0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    stepped = (logits - 0.1 * grad).log_softmax(-1)
    assert float(-(stepped.exp() * stepped).sum(-1).mean()) > float(entropy.mean())


# -- DAPO's soft overlong punishment ------------------------------------------------------------------
def test_soft_overlong_penalty_by_hand():
    # L_max 20, L_cache 5: free up to 15, then linear to -1 at 20, -1 beyond
    lengths = torch.tensor([10, 15, 16, 18, 20, 21])
    expected = [0.0, 0.0, (15 - 16) / 5, (15 - 18) / 5, -1.0, -1.0]
    assert soft_overlong_penalty(lengths, 20, 5).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError):
        soft_overlong_penalty(lengths, 20, 0)
