"""GRPO math checked against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from r1v3.rl.advantages import group_advantages, zero_variance_groups
from r1v3.rl.entropy import entropy_from_logits, masked_mean, normalized_entropy
from r1v3.rl.losses import aggregate, kl_penalty, micro_batch_share, policy_loss, sequence_kl

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- advantages

# Two groups of G=4, used by several tests:
#   group 1 [1, 0, 0, 1]: mean 0.5, deviations ±0.5,
#       unbiased var = 4 * 0.5² / 3 = 1/3, std = 0.5773503
#   group 2 [1, 1, 1, 0]: mean 0.75, deviations [.25, .25, .25, -.75],
#       unbiased var = (3 * 0.0625 + 0.5625) / 3 = 0.25, std = 0.5
TWO_GROUPS = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0])


def test_group_advantages_single_group():
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1]), group_size=4)
    # ±0.5 / (0.5773503 + 1e-6) = ±0.8660239 (eps shifts the 6th decimal only)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    close(adv, [a, -a, -a, a])


def test_group_advantages_several_groups():
    adv = group_advantages(TWO_GROUPS, group_size=4, eps=0.0)
    # group 1: ±0.5 / 0.5773503 = ±0.8660254; group 2: [.25, .25, .25, -.75] / 0.5 = [.5, .5, .5, -1.5]
    a = 0.8660254037844387
    close(adv, [a, -a, -a, a, 0.5, 0.5, 0.5, -1.5])


def test_group_advantages_pair():
    # [2, 0]: mean 1, unbiased std = sqrt((1² + 1²) / 1) = 1.4142136 → ±0.7071068
    close(group_advantages(torch.tensor([2.0, 0.0]), 2, eps=0.0), [0.70710678, -0.70710678])


def test_group_advantages_batch_std():
    adv = group_advantages(TWO_GROUPS, group_size=4, std_mode="batch", eps=0.0)
    # whole batch: mean 5/8 = 0.625; five 1s deviate by 0.375, three 0s by -0.625;
    # sum of squares = 5 * 0.140625 + 3 * 0.390625 = 1.875; unbiased var = 1.875 / 7, std = 0.5175492.
    # Mean stays per group: group 1 ±0.5 / 0.5175492 = ±0.9660918,
    # group 2 [.25, .25, .25, -.75] / 0.5175492 = [0.4830459 x3, -1.4491377]
    a, b, c = 0.9660917830792959, 0.48304589153964794, 1.449137674618944
    close(adv, [a, -a, -a, a, b, b, b, -c])


def test_group_advantages_no_std():
    # Dr.GRPO: only centred. group 1: ±0.5; group 2: [.25, .25, .25, -.75]
    adv = group_advantages(TWO_GROUPS, group_size=4, std_mode="none")
    close(adv, [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_group_advantages_eps():
    # eps = 0.5 on [1, 0, 0, 1]: 0.5 / (0.5773503 + 0.5) = 0.4641016
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1]), 4, eps=0.5)
    close(adv, [0.4641016, -0.4641016, -0.4641016, 0.4641016])
    # a zero-variance group: 0 / (0 + eps) = 0 exactly, for any mode
    for mode in ("group", "batch", "none"):
        assert torch.equal(group_advantages(torch.tensor([0.8, 0.8, 0.8]), 3, mode), torch.zeros(3))


def test_all_equal_groups_get_exactly_zero():
    # The float32 mean of G equal rewards can sit one rounding step off the reward itself
    # (eight 0.8s: mean - 0.8 = -6e-8), and dividing that residue by the group std + eps
    # (0 + 1e-6) gave -0.056 per sample. A flat group holds no signal: its advantage is exactly 0,
    # in every mode and beside groups that do vary.
    for value in (0.2, 0.8, 1 / 3):
        for G in (4, 7, 8, 16):
            flat = torch.full((G,), value)
            for mode in ("group", "batch", "none"):
                assert torch.equal(group_advantages(flat, G, mode), torch.zeros(G)), (value, G, mode)
            mixed = torch.cat([flat, torch.arange(G, dtype=torch.float32) / G])
            adv = group_advantages(mixed, G, "batch")
            assert torch.equal(adv[:G], torch.zeros(G)) and adv[G:].abs().max() > 0.5


def test_group_advantages_group_size_one():
    # One sample per prompt: unbiased std undefined (divisor 0); defined as advantage 0, no NaN.
    for mode in ("group", "batch", "none"):
        assert torch.equal(group_advantages(torch.tensor([0.3, 0.7, 1.0]), 1, mode), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([0.3]), 1, "batch"), torch.zeros(1))


def test_group_advantages_integer_rewards_and_bad_shape():
    a = 0.8660254
    close(group_advantages(torch.tensor([1, 0, 0, 1]), 4, eps=0.0), [a, -a, -a, a])
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 2), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 2, std_mode="bogus")


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0.2, 0.2, 0.2])
    assert zero_variance_groups(rewards, 3).tolist() == [True, False, True]
    assert zero_variance_groups(torch.tensor([0.0, 1.0]), 1).tolist() == [True, True]
    # consistent with the advantages: zero-variance groups get exactly 0
    adv = group_advantages(rewards, 3).view(3, 3)
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))


# ----------------------------------------------------------------------------- aggregate

# 2×3 example; position [0, 2] is padding.
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def test_aggregate_hand_values():
    # seq-mean-token-mean: row 0 (1 + 2) / 2 = 1.5, row 1 (4 + 5 + 6) / 3 = 5 → (1.5 + 5) / 2 = 3.25
    close(aggregate(VALUES, MASK, "seq-mean-token-mean"), 3.25)
    # token-mean: (1 + 2 + 4 + 5 + 6) / 5 = 18 / 5 = 3.6
    close(aggregate(VALUES, MASK, "token-mean"), 3.6)
    # seq-mean-token-sum-norm, norm = T = 3: row sums 3 and 15 → (3/3 + 15/3) / 2 = 3
    close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm"), 3.0)
    # norm_length = 10: (0.3 + 1.5) / 2 = 0.9
    close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_length=10), 0.9)


def test_aggregate_gradients():
    v = VALUES.clone().requires_grad_()
    aggregate(v, MASK, "seq-mean-token-mean").backward()
    # row 0 tokens: 1/2 (token mean) * 1/2 (seq mean) = 0.25; row 1: 1/3 * 1/2 = 1/6; padding 0
    close(v.grad, [[0.25, 0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]])
    v.grad = None
    aggregate(v, MASK, "token-mean").backward()
    close(v.grad, [[0.2, 0.2, 0.0], [0.2, 0.2, 0.2]])  # 1/5 each
    v.grad = None
    aggregate(v, MASK, "seq-mean-token-sum-norm").backward()
    close(v.grad, [[1 / 6, 1 / 6, 0.0], [1 / 6, 1 / 6, 1 / 6]])  # 1/T * 1/B = 1/3 * 1/2


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_padding_is_inert(mode):
    reference = aggregate(VALUES, MASK, mode)
    for junk in (1e6, float("inf"), float("nan")):
        v = VALUES.clone()
        v[0, 2] = junk
        v.requires_grad_()
        out = aggregate(v, MASK, mode)
        close(out, reference)
        out.backward()
        assert torch.isfinite(v.grad).all() and v.grad[0, 2] == 0


def test_aggregate_empty_sequences():
    mask = torch.tensor([[0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    # empty row 0 is left out of the outer mean: just row 1's mean, 15 / 3 = 5
    close(aggregate(VALUES, mask, "seq-mean-token-mean"), 5.0)
    close(aggregate(VALUES, mask, "token-mean"), 5.0)  # 15 / 3
    # constant normalizer counts every row: (0 + 15/3) / 2 = 2.5
    close(aggregate(VALUES, mask, "seq-mean-token-sum-norm"), 2.5)
    # nothing at all: 0, no NaN, still part of the graph with zero gradient
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGG_MODES:
        v = VALUES.clone().requires_grad_()
        out = aggregate(v, empty, mode)
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert torch.equal(v.grad, torch.zeros(2, 3))


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError):
        aggregate(VALUES, MASK, "sum")
    with pytest.raises(ValueError):
        aggregate(VALUES, MASK[:, :2], "token-mean")


# ----------------------------------------------------------------------------- policy_loss


@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_on_policy_is_reinforce(mode):
    gen = torch.Generator().manual_seed(0)
    base = -torch.rand(3, 4, generator=gen) * 3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, -0.5, 2.0])

    logp = base.clone().requires_grad_()
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, agg=mode)
    loss.backward()

    # value: ρ ≡ 1, so each token contributes -A_i: -aggregate(A broadcast over the tokens)
    close(loss, -aggregate(adv[:, None].expand(3, 4), mask, mode))
    # gradient: REINFORCE, -aggregate(logp · A)
    ref = base.clone().requires_grad_()
    aggregate(-(ref * adv[:, None]), mask, mode).backward()
    close(logp.grad, ref.grad)
    assert stats["clip_frac"].item() == 0.0
    close(stats["ratio_mean"], 1.0)
    close(stats["approx_kl_old"], 0.0)
    if mode == "seq-mean-token-mean":
        close(loss, -(1.5 - 0.5 + 2.0) / 3)  # = -1


def _loss_and_grad(log_ratios, adv, mask=None, **kw):
    """Runs policy_loss with old_logp = 0 so that logp is the log-ratio."""
    logp = torch.tensor([log_ratios], dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else torch.tensor([mask])
    adv = torch.tensor([adv], dtype=torch.float64)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), adv, mask, **kw)
    loss.backward()
    return loss, logp.grad[0], stats


RATIOS = [1.5, 1.1, 0.5]
LOG_RATIOS = [math.log(r) for r in RATIOS]


def test_policy_loss_clips_positive_advantage_above():
    loss, grad, stats = _loss_and_grad(LOG_RATIOS, 1.0)
    # A = +1, ε = 0.2: token 0 min(1.5, 1.2) = 1.2 (clip binds), token 1 min(1.1, 1.1) = 1.1,
    # token 2 min(0.5, 0.8) = 0.5 (unclipped term is smaller). loss = -(1.2 + 1.1 + 0.5) / 3
    close(loss, -2.8 / 3)
    # d/dlogp of -ρA/3 is -ρA/3 on active tokens; the clipped token 0 has zero gradient
    close(grad, [0.0, -1.1 / 3, -0.5 / 3])
    close(stats["clip_frac"], 1 / 3)
    close(stats["clip_frac_high"], 1 / 3)
    close(stats["clip_frac_low"], 0.0)
    close(stats["ratio_mean"], 3.1 / 3)  # (1.5 + 1.1 + 0.5) / 3
    close(stats["ratio_min"], 0.5)
    close(stats["ratio_max"], 1.5)
    # k3 of KL(π_old‖πθ): mean(ρ - 1 - ln ρ) =
    # ((0.5 - 0.405465) + (0.1 - 0.095310) + (-0.5 + 0.693147)) / 3 = 0.292372 / 3 = 0.097457
    close(stats["approx_kl_old"], 0.0974573, atol=1e-6)


def test_policy_loss_clips_negative_advantage_below():
    loss, grad, stats = _loss_and_grad(LOG_RATIOS, -1.0)
    # A = -1: token 0 min(-1.5, -1.2) = -1.5 (unclipped), token 1 -1.1,
    # token 2 min(-0.5, -0.8) = -0.8 (clip binds). loss = (1.5 + 1.1 + 0.8) / 3
    close(loss, 3.4 / 3)
    close(grad, [1.5 / 3, 1.1 / 3, 0.0])
    close(stats["clip_frac"], 1 / 3)
    close(stats["clip_frac_low"], 1 / 3)
    close(stats["clip_frac_high"], 0.0)


def test_policy_loss_clip_higher_asymmetry():
    # ρ = 1.25, A > 0: binds at ε_high = 0.2 (1.25 > 1.2) but not at ε_high = 0.28 (DAPO)
    loss, grad, stats = _loss_and_grad([math.log(1.25)], 1.0, clip_eps_high=0.2)
    close(loss, -1.2)
    close(grad, [0.0])
    close(stats["clip_frac"], 1.0)
    loss, grad, stats = _loss_and_grad([math.log(1.25)], 1.0, clip_eps_high=0.28)
    close(loss, -1.25)
    close(grad, [-1.25])
    close(stats["clip_frac"], 0.0)
    # ε_high leaves the negative side alone: ρ = 0.75 < 1 - 0.2 with A < 0 binds either way
    for eps_high in (0.2, 0.28):
        loss, grad, stats = _loss_and_grad([math.log(0.75)], -1.0, clip_eps_high=eps_high)
        close(loss, 0.8)  # -min(-0.75, -0.8) = 0.8
        close(grad, [0.0])
        close(stats["clip_frac"], 1.0)
    # and ε_low acts on it: with ε_low = 0.3, 0.75 > 0.7 so nothing binds; loss = 0.75, grad = ρ|A| = 0.75
    loss, grad, stats = _loss_and_grad([math.log(0.75)], -1.0, clip_eps_low=0.3)
    close(loss, 0.75)
    close(grad, [0.75])
    close(stats["clip_frac"], 0.0)


def test_policy_loss_padding_is_inert():
    loss, grad, stats = _loss_and_grad(LOG_RATIOS, 1.0)
    # a padded 4th position with an absurd log-ratio: nothing changes
    loss2, grad2, stats2 = _loss_and_grad(LOG_RATIOS + [100.0], 1.0, mask=[True, True, True, False])
    close(loss2, loss)
    close(grad2[:3], grad)
    assert grad2[3] == 0
    for k in stats:
        close(stats2[k], stats[k])


def test_policy_loss_token_level_advantages_and_empty_mask():
    # [B, T] advantages: A = [+1, -1] on ρ = [1.5, 0.5]: both bind (1.2 and -0.8) → loss -(1.2 - 0.8) / 2
    loss, stats = policy_loss(
        torch.tensor([[math.log(1.5), math.log(0.5)]]), torch.zeros(1, 2),
        torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool),
    )
    close(loss, -0.2)
    close(stats["clip_frac"], 1.0)
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    assert all(torch.isfinite(v) for v in stats.values())
    close(stats["ratio_min"], 1.0)


# ----------------------------------------------------------------------------- KL


def test_kl_penalty_hand_values():
    # πθ = [0.5, 0.25], πref = [0.25, 0.5] at the two sampled tokens
    logp = torch.log(torch.tensor([0.5, 0.25], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.25, 0.5], dtype=torch.float64))
    # lr = ref - logp = [ln 0.5, ln 2] = [-0.693147, 0.693147]
    close(kl_penalty(logp, ref, "k1"), [0.6931472, -0.6931472])  # -lr
    close(kl_penalty(logp, ref, "k2"), [0.2402265, 0.2402265])  # 0.693147² / 2
    # exp(lr) - 1 - lr: 0.5 - 1 + 0.693147 = 0.193147; 2 - 1 - 0.693147 = 0.306853
    close(kl_penalty(logp, ref, "k3"), [0.1931472, 0.3068528])
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_kl_penalty_zero_and_nonnegative():
    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(64, generator=gen) * 5
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), kind), torch.zeros(64))
    ref = -torch.rand(64, generator=gen) * 5
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone is not a per-token bound


def test_kl_penalty_gradients_closed_form():
    gen = torch.Generator().manual_seed(2)
    base = -torch.rand(8, generator=gen, dtype=torch.float64) * 4
    ref = -torch.rand(8, generator=gen, dtype=torch.float64) * 4
    lr = ref - base
    expected = {"k1": torch.ones(8, dtype=torch.float64), "k2": -lr, "k3": 1 - lr.exp()}
    for kind, want in expected.items():
        logp = base.clone().requires_grad_()
        ref_leaf = ref.clone().requires_grad_()
        kl_penalty(logp, ref_leaf, kind).sum().backward()
        close(logp.grad, want, atol=1e-12)
        assert ref_leaf.grad is None  # the reference is a constant


def test_kl_penalty_k3_clamped():
    out = kl_penalty(torch.tensor([-80.0]), torch.tensor([0.0]), "k3")  # lr = 80, clamped to 20
    assert torch.isfinite(out).all()
    close(out, [math.exp(20) - 21], atol=1e-6 * math.exp(20))  # float32 relative precision


def test_sequence_kl_masks_padding():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.25, 0.5, 1e-30]], dtype=torch.float64))
    mask = torch.tensor([[True, True, False]])
    # token sums over the first two positions (values from test_kl_penalty_hand_values)
    close(sequence_kl(logp, ref, mask, "k1"), [0.0])
    close(sequence_kl(logp, ref, mask, "k2"), [0.4804530])
    close(sequence_kl(logp, ref, mask, "k3"), [0.5])  # 0.193147 + 0.306853


PI = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
PI_REF = torch.full((4,), 0.25, dtype=torch.float64)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum()


def test_kl_estimators_expected_value():
    # Exact expectation over y ~ πθ: k1 and k3 are unbiased for KL(πθ‖πref); k2 is close but biased.
    # KL = 0.4 ln 1.6 + 0.3 ln 1.2 + 0.2 ln 0.8 + 0.1 ln 0.4 = 0.106440
    exact = _kl(PI, PI_REF)
    close(exact, 0.1064401, atol=1e-6)
    logp, ref = PI.log(), PI_REF.log()
    close((PI * kl_penalty(logp, ref, "k1")).sum(), exact, atol=1e-12)
    close((PI * kl_penalty(logp, ref, "k3")).sum(), exact, atol=1e-12)
    # E[k2] = ½ Σ p (ln p/q)² = 0.096109: within 10% here
    assert abs((PI * kl_penalty(logp, ref, "k2")).sum() - exact) < 0.1 * exact

    # Monte Carlo with a fixed seed, loose tolerance.
    gen = torch.Generator().manual_seed(0)
    ys = torch.multinomial(PI, 200_000, replacement=True, generator=gen)
    for kind, tol in (("k1", 0.01), ("k2", 0.02), ("k3", 0.01)):
        est = kl_penalty(logp[ys], ref[ys], kind).mean()
        assert abs(est - exact) < tol, (kind, est.item(), exact.item())


def test_kl_estimators_expected_gradient():
    # E_{y~πθ}[∇ k(y)] with the expectation taken exactly (weights πθ detached, i.e. a fixed batch)
    # versus the true gradients of the reverse and forward KL, from autograd.
    theta0 = torch.tensor([0.3, -0.2, 0.1, -0.5], dtype=torch.float64)
    ref = PI_REF.log()

    def expected_grad(kind):
        theta = theta0.clone().requires_grad_()
        logp = torch.log_softmax(theta, -1)
        (logp.exp().detach() * kl_penalty(logp, ref, kind)).sum().backward()
        return theta.grad

    def true_grad(reverse):
        theta = theta0.clone().requires_grad_()
        p = torch.softmax(theta, -1)
        (_kl(p, PI_REF) if reverse else _kl(PI_REF, p)).backward()
        return theta.grad

    close(expected_grad("k1"), torch.zeros(4), atol=1e-12)  # zero in expectation
    close(expected_grad("k2"), true_grad(reverse=True), atol=1e-12)  # reverse KL(πθ‖πref)
    close(expected_grad("k3"), true_grad(reverse=False), atol=1e-12)  # forward KL(πref‖πθ)
    assert (true_grad(True) - true_grad(False)).abs().max() > 1e-3  # the two really differ here


# ----------------------------------------------------------------------------- entropy


def test_entropy_uniform_and_normalized():
    h = entropy_from_logits(torch.zeros(2, 7))
    close(h, [math.log(7)] * 2)  # ln 7 = 1.9459101
    close(normalized_entropy(h, 7), [1.0, 1.0])
    with pytest.raises(ValueError):
        normalized_entropy(h, 1)


def test_entropy_peaked_and_hand_example():
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0, 0.0])).item() < 1e-6
    # logits (ln 2, 0, 0) → p = (0.5, 0.25, 0.25):
    # H = 0.5 ln 2 + 2 * 0.25 ln 4 = 0.5 ln 2 + ln 2 = 1.5 ln 2 = 1.0397208
    close(entropy_from_logits(torch.tensor([math.log(2), 0.0, 0.0])), 1.0397208)
    # far out logits are shifted internally: same as the shifted input, no overflow
    big = torch.tensor([1e4 + math.log(2), 1e4, 1e4])
    close(entropy_from_logits(big), 1.0397208, atol=1e-3)  # float32 spacing at 1e4 is ~1e-3
    close(entropy_from_logits(torch.tensor([-1e30, 0.0, 0.0])), math.log(2))


def test_entropy_chunked_matches_unchunked_and_dtype():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    full = entropy_from_logits(logits, chunk_size=10**6)
    assert full.shape == (3, 5) and full.dtype == torch.float32
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), full)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=1), full)
    # bf16 in, float32 out; the value equals the float32 computation on the bf16-rounded logits
    half = logits.bfloat16()
    torch.testing.assert_close(entropy_from_logits(half, chunk_size=4), entropy_from_logits(half.float()))
    assert entropy_from_logits(torch.zeros(0, 5)).shape == (0,)


def test_entropy_with_masked_vocab_has_no_nan():
    logits = torch.tensor([[0.0, 0.0, -float("inf"), -float("inf")], [math.log(2), 0.0, 0.0, -float("inf")]],
                          requires_grad=True)
    h = entropy_from_logits(logits)
    close(h, [math.log(2), 1.0397208])  # two equal tokens; the (0.5, .25, .25) example
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, -1] == 0).all()


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = masked_mean(values, mask)
    close(out, 2.0)  # (1 + 2 + 3) / 3; padding (100, nan, inf) ignored
    out.backward()
    close(values.grad, [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]])
    empty = masked_mean(values, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0  # not NaN


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_shares_recombine_the_batch_aggregate(mode):
    # 4 rows of 3 positions, row 1 empty (a masked truncation). Cut as [0, 1] + [2, 3]:
    #   seq-mean-token-mean: row means 2, -, 4, 1.5 over 3 non-empty rows = 7.5 / 3 = 2.5;
    #   the cut's shares are 1/3 and 2/3: 1/3 * 2 + 2/3 * (4 + 1.5) / 2 = 2.5.
    values = torch.tensor([[1.0, 2, 3], [9, 9, 9], [4, 4, 4], [1, 2, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    whole = aggregate(values, mask, mode)
    for cut in ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [[0, 1, 2], [3]]):
        parts = sum(micro_batch_share(mask[rows], mask, mode) * aggregate(values[rows], mask[rows], mode)
                    for rows in map(torch.tensor, cut))
        close(parts, whole)
    if mode == "seq-mean-token-mean":
        close(whole, 2.5)
        assert micro_batch_share(mask[:2], mask, mode) == pytest.approx(1 / 3)
