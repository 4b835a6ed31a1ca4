"""Paired bootstrap intervals, paired tests, Holm correction and the seed-vs-impression noise."""

import numpy as np
import pytest

from mmnewsrec.evaluate.significance import (
    bootstrap_means,
    compare,
    compare_table,
    holm,
    noise_source,
    paired_p_values,
    seed_se,
)


def test_holm_matches_the_hand_computed_step_down():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    adjusted = holm(np.array([0.01, 0.04, 0.03, 0.005]))
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm(np.array([0.5, 0.9]))[1] == 1.0  # capped at 1
    assert np.isnan(holm(np.array([np.nan, 0.01]))).tolist() == [True, False]


def test_every_resample_draws_as_many_impressions_as_there_are():
    means = bootstrap_means(np.ones((7, 3)), resamples=50)
    assert means.shape == (50, 3) and np.all(means == 1.0)
    # two impressions: a resample mean of (0, 1) is 0, 1/2 or 1, about 1/4, 1/2, 1/4 of the time
    draws = bootstrap_means(np.array([[0.0], [1.0]]), resamples=4000, seed=3)[:, 0]
    shares = [np.mean(draws == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_the_interval_of_a_mean_has_the_normal_width():
    values = np.random.default_rng(0).normal(size=(4000, 1))
    means = bootstrap_means(values, resamples=2000, seed=1)[:, 0]
    assert means.std() == pytest.approx(1 / np.sqrt(4000), rel=0.1)
    assert means.mean() == pytest.approx(values.mean(), abs=0.005)


def test_the_bootstrap_is_paired_and_seeded():
    noisy = np.random.default_rng(1).normal(size=5000)
    values = np.stack([noisy, noisy + 0.01], axis=1)  # a constant gain under a large spread
    result = compare(values, np.array([[1, 0]]), resamples=1000, seed=7)
    assert result.diff[0] == pytest.approx(0.01)
    # paired: each resample shares its impressions between the rows, so no spread at all
    assert result.low[0] == pytest.approx(0.01) and result.high[0] == pytest.approx(0.01)
    assert result.p[0] < 1e-12
    again = compare(values + np.array([0.0, 1e-3]) * noisy[:, None], np.array([[1, 0]]), seed=7)
    assert again.low[0] < again.diff[0] < again.high[0]
    same_seed = compare(values + np.array([0.0, 1e-3]) * noisy[:, None], np.array([[1, 0]]), seed=7)
    assert same_seed.low[0] == again.low[0]


def test_paired_t_test_of_a_hand_case():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 * sqrt(3) = 3.464 on 2 degrees of freedom
    values = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert paired_p_values(values, np.array([[0, 1]]))[0] == pytest.approx(0.07418, abs=1e-4)
    assert paired_p_values(values, np.array([[1, 1]]))[0] == 1.0  # a row against itself
    wilcoxon = paired_p_values(values, np.array([[0, 1]]), test="wilcoxon")[0]
    assert wilcoxon == pytest.approx(0.25)  # all 3 signs positive: 2 * 1/8 (exact)
    with pytest.raises(ValueError, match="wilcoxon"):
        paired_p_values(values, np.array([[0, 1]]), test="sign")


def test_unscored_impressions_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_means(np.array([[0.5, np.nan]]))


def test_seed_noise_against_impression_noise():
    std, seeds = np.array([0.01, 0.02, 0.0]), np.array([2, 2, 1])
    se = seed_se(std, seeds, np.array([[0, 1], [2, 2]]))
    assert se[0] == pytest.approx(np.sqrt(0.0001 / 2 + 0.0004 / 2))
    assert np.isnan(se[1])  # one seed each: not measured
    assert noise_source(se, np.array([0.001, 0.001])) == ["seeds", "-"]
    assert noise_source(se, np.array([0.1, 0.1])) == ["impressions", "-"]


def test_a_table_compares_every_row_with_the_best_and_the_baseline():
    rng = np.random.default_rng(2)
    base = rng.random(3000)
    # row 0 best, row 1 a hair below it (not significant), row 2 far below: the baseline
    hair = rng.normal(size=3000)
    hair -= hair.mean()  # no mean difference at all: p = 1
    auc = np.stack([base + 0.1, base + 0.1 + 1e-4 * hair, base], axis=1)
    values = {"auc": auc, "mrr": auc / 2}
    std = {"auc": np.array([0.0, 0.0, 0.0]), "mrr": np.zeros(3)}
    table = compare_table(values, std, np.array([1, 1, 1]), baseline=2, resamples=200)
    assert set(table[0]) == {"auc_vs_baseline", "mrr_vs_baseline"}
    assert set(table[2]) == {"auc_vs_best", "mrr_vs_best"}
    assert not table[1]["auc_vs_best"]["significant"]
    assert table[1]["auc_vs_best"]["low"] < 0 < table[1]["auc_vs_best"]["high"]
    assert table[2]["auc_vs_best"]["significant"]
    assert table[2]["auc_vs_best"]["diff"] == pytest.approx(-0.1)
    assert table[0]["auc_vs_baseline"]["low"] == pytest.approx(0.1)
    assert table[1]["mrr_vs_baseline"]["noise"] == "-"
    # Holm over the 8 comparisons of the table: the raw p-value times at most 8
    entry = table[1]["auc_vs_best"]
    assert entry["p"] <= entry["p_holm"] <= min(1.0, 8 * entry["p"])
