"""Metrics against a per-impression reference in the style of the official MIND scorer."""

import numpy as np
import pytest
from mind_reference import official_order, reference

from mmnewsrec.metrics import (
    METRICS,
    evaluate_scores,
    impression_metrics,
    ranks_from_scores,
)


def random_impressions(seed, num=200, max_size=60, levels=4, dtype=np.float32):
    """Varied sizes (0 included), scores with many ties, ~30% clicks."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, max_size, num)
    sizes[rng.random(num) < 0.1] = 1
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    scores = (rng.integers(0, levels, offsets[-1]) + rng.random() - 0.5).astype(dtype)
    labels = (rng.random(offsets[-1]) < 0.3).astype(np.int8)
    return scores, labels, offsets


@pytest.mark.parametrize(
    ("seed", "levels", "dtype", "chunk_rows"),
    [
        (0, 3, np.float32, 1 << 22),
        (1, 5, np.float32, 97),
        (2, 1000, np.float64, 500),
        (3, 2, np.int64, 1),
        (4, 10**9, np.float64, 1 << 22),
    ],
)
def test_matches_official_style_reference(seed, levels, dtype, chunk_rows):
    scores, labels, offsets = random_impressions(seed, levels=levels, dtype=dtype)
    got = impression_metrics(scores, labels, offsets, chunk_rows=chunk_rows)
    expected = reference(scores, labels, offsets)
    scored = np.array([e is not None for e in expected])
    np.testing.assert_array_equal(got.scored, scored)
    table = np.array([e for e in expected if e is not None])
    for j, name in enumerate(METRICS):
        np.testing.assert_allclose(getattr(got, name)[scored], table[:, j], rtol=0, atol=1e-12)
        assert np.isnan(getattr(got, name)[~scored]).all()
    summary = evaluate_scores(scores, labels, offsets)
    np.testing.assert_allclose([summary[m] for m in METRICS], table.mean(axis=0), atol=1e-12)
    assert summary["impressions"] == scored.sum()
    assert summary["skipped"] == (~scored).sum()


def test_float64_scores_closer_than_float32_keep_their_order():
    scores = np.array([1.0, 1.0 + 1e-12, 1.0 + 2e-12])
    m = evaluate_scores(scores, np.array([0, 0, 1]), np.array([0, 3]))
    assert m["auc"] == 1.0
    assert m["mrr"] == 1.0


def test_hand_checked_impressions():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.5, 0.1], dtype=np.float32)
    labels = np.array([0, 1, 0, 0, 0, 1], dtype=np.int8)
    m = impression_metrics(scores, labels, np.array([0, 3, 6]))
    # clicked candidate ranked first
    assert (m.auc[0], m.mrr[0], m.ndcg5[0], m.ndcg10[0]) == (1.0, 1.0, 1.0, 1.0)
    # clicked candidate ranked last of three: gain 1 / log2(4) against an ideal of 1
    assert (m.auc[1], m.mrr[1], m.ndcg5[1]) == (0.0, pytest.approx(1 / 3), 0.5)


def test_ties_half_credit_and_later_candidate_first():
    offsets = np.array([0, 2, 4])
    scores = np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    m = impression_metrics(scores, np.array([1, 0, 0, 1]), offsets)
    np.testing.assert_array_equal(m.auc, [0.5, 0.5])
    # the earlier click is ranked second, the later one first
    np.testing.assert_allclose(m.mrr, [0.5, 1.0])
    np.testing.assert_allclose(m.ndcg10, [1 / np.log2(3), 1.0])


def test_negative_zero_ties_with_zero():
    m = evaluate_scores(np.array([0.0, -0.0], dtype=np.float32), np.array([0, 1]), np.array([0, 2]))
    assert (m["auc"], m["mrr"]) == (0.5, 1.0)


def test_ranks_follow_stable_descending_order():
    scores, _, offsets = random_impressions(5, levels=3)
    ranks = ranks_from_scores(scores, offsets)
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        expected = np.empty(hi - lo, dtype=np.int64)
        expected[official_order(scores[lo:hi])] = np.arange(1, hi - lo + 1)
        np.testing.assert_array_equal(ranks[lo:hi], expected)


def test_ranks_of_one_large_impression_among_small_ones():
    rng = np.random.default_rng(6)
    sizes = np.array([3, 5000, 0, 2, 1])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    scores = rng.integers(0, 50, offsets[-1]).astype(np.float32)
    ranks = ranks_from_scores(scores, offsets)
    big = slice(offsets[1], offsets[2])
    expected = np.empty(5000, dtype=np.int64)
    expected[official_order(scores[big])] = np.arange(1, 5001)
    np.testing.assert_array_equal(ranks[big], expected)
    assert ranks[offsets[-2]] == 1


def test_skipped_impressions_are_counted():
    # sizes 0, 1, all clicked, none clicked, one scored impression
    offsets = np.array([0, 0, 1, 4, 6, 8])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 1], dtype=np.int8)
    scores = np.arange(8, dtype=np.float32)
    m = impression_metrics(scores, labels, offsets)
    np.testing.assert_array_equal(m.scored, [False, False, False, False, True])
    summary = m.summary()
    assert (summary["impressions"], summary["skipped"], summary["auc"]) == (1, 4, 1.0)


def test_nothing_scored_gives_nan_means():
    summary = evaluate_scores(np.zeros(3), np.zeros(3, dtype=np.int8), np.array([0, 1, 3]))
    assert summary["impressions"] == 0
    assert summary["skipped"] == 2
    assert all(np.isnan(summary[m]) for m in METRICS)


@pytest.mark.parametrize(
    ("scores", "labels", "offsets", "message"),
    [
        ([0.1, 0.2], [1, -1], [0, 2], r"candidate 1 of impression 0 has -1 \(an unlabelled"),
        ([0.1, 0.2], [1, 2], [0, 2], "labels must be 0 or 1"),
        ([0.1, np.nan], [1, 0], [0, 2], "score of candidate 1 is nan"),
        ([0.1, 0.2], [1, 0], [0, 3], "offsets must run from 0 to 2"),
        ([0.1, 0.2], [1, 0], [0, 2, 1, 2], "non-decreasing"),
        ([0.1, 0.2], [1, 0, 0], [0, 2], "labels have shape"),
    ],
)
def test_bad_input_is_rejected(scores, labels, offsets, message):
    with pytest.raises(ValueError, match=message):
        evaluate_scores(np.array(scores), np.array(labels), np.array(offsets))
