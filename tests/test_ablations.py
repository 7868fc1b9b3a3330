"""Ablation verdicts: the pre-set rule by hand, and a smoke run of the runner's plumbing."""

import json

import pytest

from r1v3.tools.ablations import ABLATIONS, ablate_main, pearson, verdict


def test_verdict_rule_by_hand():
    assert verdict([0.10, 0.12, 0.08], tau=0.02) == "reproduced"  # mean 0.10 > sd 0.02 and τ
    assert verdict([0.01, -0.01, 0.0], tau=0.02) == "not reproduced"  # 0 + 0.01 < τ: no effect
    assert verdict([-0.2, -0.1, -0.15], tau=0.02) == "not reproduced"  # the opposite effect
    assert verdict([0.3, -0.2, 0.1], tau=0.02) == "inconclusive"  # spread swamps the mean
    assert verdict([0.015, 0.016, 0.017], tau=0.02) == "not reproduced"  # consistent, but below τ
    assert verdict([0.03, 0.0, 0.015], tau=0.02) == "inconclusive"  # might or might not reach τ


def test_pearson_is_zero_without_variation():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) == 0.0 and pearson([1, 2], [3, 4]) == 0.0


def test_every_ablation_states_its_claim_metric_and_threshold():
    assert set(ABLATIONS) == {"a_rl_vs_sft", "b_connector_frozen", "c_post_rl_tuning", "d_lr_high_low",
                              "e_curriculum", "f_critical_entropy"}
    for claim, metric, tau, fn in ABLATIONS.values():
        assert claim and metric.startswith("d = ") and tau > 0 and callable(fn)


@pytest.mark.slow
def test_smoke_run_writes_the_verdict_table(tmp_path):
    assert ablate_main(["b_connector_frozen", "f_critical_entropy", "--smoke", "--seeds", "0",
                        "--workdir", str(tmp_path)]) == 0
    table = (tmp_path / "VERDICTS.md").read_text()
    assert "b_connector_frozen" in table and "Rule (fixed before the runs)" in table
    entry = json.loads((tmp_path / "b_connector_frozen.json").read_text())
    row = entry["seeds"]["0"]
    assert {"reward_trainable", "reward_frozen", "grad_cv_frozen", "repetition_frozen", "d"} <= row.keys()
    assert entry["verdict"] == "inconclusive", "one seed is never enough for a verdict"
    # The shared GRPO arm ran once and both ablations read it from the cache.
    assert (tmp_path / "seed0" / "grpo" / "result.json").exists()
    assert ablate_main(["nope", "--workdir", str(tmp_path)]) == 2
