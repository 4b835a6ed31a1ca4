"""Beyond-accuracy metrics of top-k lists against small hand-computed cases."""

import numpy as np
import pytest

from mmnewsrec.evaluate.beyond_accuracy import (
    by_candidate_age,
    by_history,
    category_entropy,
    coverage,
    image_share,
    intra_list_diversity,
    novelty,
    personalisation,
    top_k_lists,
    user_popularity,
)


def test_top_k_lists_take_the_best_scored_candidates_in_order():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.2])
    items = np.array([5, 6, 7, 8, 9])
    offsets = np.array([0, 3, 5])
    assert top_k_lists(scores, items, offsets, k=2).tolist() == [[6, 7], [8, 9]]
    assert top_k_lists(scores, items, offsets, k=4).tolist() == [[6, 7, 5, 0], [8, 9, 0, 0]]


def test_intra_list_diversity_is_the_mean_pairwise_cosine_distance():
    vectors = np.array([[0, 0], [1, 0], [0, 1], [2, 2]], dtype=np.float16)  # row 0: padding
    lists = np.array([[1, 2, 0], [1, 3, 0], [1, 2, 3], [1, 0, 0]])
    c = 1 / np.sqrt(2)  # cos of (1, 0) and (2, 2)
    expected = [1.0, 1 - c, (1 + 2 * (1 - c)) / 3]
    diversity = intra_list_diversity(lists, vectors)
    assert diversity[:3] == pytest.approx(expected, abs=1e-6)
    assert np.isnan(diversity[3])  # one item: no pair


def test_category_entropy_in_bits():
    categories = np.array([0, 1, 1, 2, 2, 3, 4])  # by news index; 0 is padding
    lists = np.array([[1, 2, 3, 4], [1, 3, 5, 6], [1, 2, 0, 0], [0, 0, 0, 0]])
    entropy = category_entropy(lists, categories)
    assert entropy[:3] == pytest.approx([1.0, 2.0, 0.0])
    assert np.isnan(entropy[3])


def test_coverage_is_the_share_of_the_catalogue_listed():
    assert coverage(np.array([[1, 2], [2, 3]]), np.arange(1, 6)) == pytest.approx(3 / 5)


def test_novelty_uses_the_smoothed_share_of_users_who_clicked():
    # user 0 clicked news 1, 2 and 1 again, user 1 news 1: news 1 by 2 users, 2 by 1, 3 by none
    popularity = user_popularity(np.array([0, 0, 0, 1]), np.array([1, 2, 1, 1]), 3)
    assert popularity == pytest.approx([1 / 3, 3 / 3, 2 / 3, 1 / 3])
    lists = np.array([[1, 2], [3, 0]])
    expected = [(0 - np.log2(2 / 3)) / 2, -np.log2(1 / 3)]
    assert novelty(lists, popularity) == pytest.approx(expected)


def test_personalisation_is_one_minus_the_mean_overlap_of_pairs():
    # overlaps: (a, b) 1 of 2, (a, c) 0, (b, c) 0 -> mean 1/6; padding never overlaps
    assert personalisation(np.array([[1, 2], [1, 3], [4, 5]])) == pytest.approx(5 / 6)
    assert personalisation(np.array([[1, 0], [2, 0]])) == pytest.approx(1.0)
    assert personalisation(np.array([[1, 2], [2, 1]])) == pytest.approx(0.0)


def test_image_share_of_each_list():
    has_image = np.array([False, True, False, True])
    share = image_share(np.array([[1, 2], [1, 3], [2, 0]]), has_image)
    assert share == pytest.approx([0.5, 1.0, 0.0])


def test_accuracy_by_history_length_bucket():
    auc = np.array([0.5, 0.7, 0.9, 0.6, 0.8, np.nan])
    metrics = {name: auc for name in ("auc", "mrr", "ndcg5", "ndcg10")}
    history = np.array([0, 5, 1, 6, 21, 0])  # the last impression is not scored
    table = by_history(metrics, history)
    assert table["0"] == {**dict.fromkeys(metrics, 0.5), "impressions": 1}
    assert table["1-5"]["auc"] == pytest.approx(0.8) and table["1-5"]["impressions"] == 2
    assert table["6-20"]["auc"] == pytest.approx(0.6)
    assert table[">20"]["auc"] == pytest.approx(0.8)


def test_accuracy_by_candidate_age_scores_the_candidates_of_each_age():
    # impression 0: fresh (< 6 h) candidates ranked right, old ones (> 24 h) wrong
    # impression 1: its fresh candidates all clicked: not scored in that bucket
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.4, 0.3])
    labels = np.array([1, 0, 1, 0, 1, 1, 0])
    ages = np.array([1.0, 5.9, 30.0, 48.0, 2.0, 3.0, 6.0])
    table = by_candidate_age(scores, labels, np.array([0, 4, 7]), ages)
    assert table["<6 h"]["auc"] == 1.0 and table["<6 h"]["impressions"] == 1
    assert table[">24 h"]["auc"] == 0.0 and table[">24 h"]["mrr"] == pytest.approx(0.5)
    assert table["6-24 h"] == {**dict.fromkeys(("auc", "mrr", "ndcg5", "ndcg10")), "impressions": 0}
