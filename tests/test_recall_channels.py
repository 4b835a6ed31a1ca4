"""The popularity/freshness channel: item statistics from the logs, and its merge into recall."""

import numpy as np
import pytest
from test_recall import behaviors

from mmnewsrec.data.store import build_store
from mmnewsrec.recall import ItemStats, Recaller, item_stats, store_item_stats
from mmnewsrec.recall.channels import DAY, NEVER
from mmnewsrec.recall.space import Part

T0 = 1_700_000_000


def timed(histories, candidates, times):
    split = behaviors(histories, candidates)
    split.times = np.asarray(times, dtype=np.int64)
    return split


def test_item_stats_decay_clicks_and_find_first_appearances():
    train = timed([[1], [2]], [[(3, 1), (4, 0)], [(3, 1), (5, 1)]], [T0, T0 + DAY])
    dev = timed([[3]], [[(6, 0), (4, 0)]], [T0 + 2 * DAY])
    stats = item_stats([train, dev], train, num_news=7, half_life_days=1.0)
    assert stats.end == T0 + 2 * DAY
    # clicks of news 3 at T0 and T0 + 1 day, seen from T0 + 2 days: 0.25 + 0.5
    np.testing.assert_allclose(stats.popularity, [0, 0, 0, 0.75, 0, 0.5, 0, 0])
    np.testing.assert_array_equal(
        stats.first_seen, [NEVER, T0, T0 + DAY, T0, T0, T0 + DAY, T0 + 2 * DAY, NEVER]
    )
    scores = stats.channel_scores(prior=1.0)
    assert scores[0] == scores[7] == -np.inf  # padding and news in no log
    # (decayed clicks + 1) halved per day since first seen: 6: 1, 5: 0.75, 2: 0.5, 3: 0.44,
    # 1 and 4: 0.25
    np.testing.assert_allclose(np.exp(scores[1:7]), [0.25, 0.5, 1.75 / 4, 0.25, 0.75, 1.0])
    with pytest.raises(ValueError, match="half_life_days"):
        item_stats([train], train, 7, half_life_days=0)


def test_item_stats_count_no_click_of_the_scored_split(tmp_path):
    """Popularity counts the click split only: a dev log with clicks changes first appearances,
    never popularity, also through `store_item_stats` on a prepared store."""
    train = timed([[1], [2]], [[(3, 1), (4, 0)], [(3, 1), (5, 1)]], [T0, T0 + DAY])
    dev = timed([[3]], [[(6, 1), (4, 1)]], [T0 + 2 * DAY])
    stats = item_stats([train, dev], train, num_news=7, half_life_days=1.0)
    np.testing.assert_allclose(stats.popularity, [0, 0, 0, 0.75, 0, 0.5, 0, 0])
    root = tmp_path / "mind"
    news = "".join(f"N{i}\tnews\tworld\tt{i}\ta\tu\t[]\t[]\n" for i in (1, 2, 3))
    rows = {"train": "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0\n",
            "dev": "2\tU2\t11/16/2019 8:55:22 AM\tN1\tN2-0 N3-1\n"}  # fmt: skip
    for split, text in rows.items():
        (root / split).mkdir(parents=True)
        (root / split / "news.tsv").write_text(news)
        (root / split / "behaviors.tsv").write_text(text)
    store = build_store(root, tmp_path / "store")
    popularity = store_item_stats(store, "train").popularity
    np.testing.assert_allclose(popularity, [0, 0, 0.5, 0])  # N2's train click, a day old


def channel_recaller(share: float = 0.5) -> Recaller:
    """News 1..10 at growing angles on a circle (plain cosine: a user at news 1 gets 2, 3, 4
    ..., one at news 10 gets 9, 8, 7 ...). News i != 9 first appears at T0 - 1 day + i hours,
    9 at T0 + 1 day with a click; 10 has 3 clicks at T0, 8 one: the channel orders
    9, 10, 8, then 7, 6 ... 1 by freshness."""
    angles = np.array([0.0, 0.2, 0.5, 0.9, 1.4, 2.0, 2.4, 2.8, 3.0, 3.1])
    vectors = np.zeros((11, 2), np.float32)
    vectors[1:] = np.stack([np.cos(angles), np.sin(angles)], 1)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 10]
    seen = timed([[]] * 9, [[(i, 0)] for i in ids], [T0 - DAY + i * 3600 for i in ids])
    clicks = timed(
        [[]] * 4,
        [[(10, 1), (8, 1)], [(10, 1)], [(10, 1)], [(9, 1)]],
        [T0, T0, T0, T0 + DAY],
    )
    stats = item_stats([seen, clicks], clicks, 10)
    return Recaller(k=4, popular_share=share, centre_parts=False).fit(vectors, stats=stats)


def test_channel_fills_its_quota_after_the_content_head():
    recaller = channel_recaller()
    users = recaller.user_vectors(np.array([[1]]))
    plain = Recaller(k=4, centre_parts=False).fit(recaller.vectors_)
    assert plain.search(users, exclude=[[1]])[1].tolist() == [[2, 3, 4, 5]]
    _, merged = recaller.search(users, exclude=[[1]])
    assert merged.tolist() == [[2, 3, 9, 10]]  # content head, then the channel's best two
    _, early = recaller.search(users, exclude=[[1]], times=[T0])
    assert early.tolist() == [[2, 3, 10, 8]]  # news 9 is not in the logs before T0 + 1 day
    assert Recaller(k=4, centre_parts=False).fit(recaller.vectors_).channel_ is None


def test_channel_skips_what_content_holds_and_content_fills_what_it_cannot():
    recaller = channel_recaller()
    user = recaller.user_vectors(np.array([[10]]))
    _, merged = recaller.search(user, exclude=[[10]])
    assert merged.tolist() == [[9, 8, 7, 6]]  # channel: 9, 8 held, 10 excluded; 7, 6 once
    scores, few = recaller.search(user, exclude=[[10]], times=[T0 - DAY + 5400])
    assert few.tolist() == [[9, 8, 1, 7]]  # only news 1 was in the logs: content fills
    np.testing.assert_allclose(scores[0], recaller.vectors_[few[0]].numpy() @ user[0], atol=1e-6)


def test_a_channel_needs_item_statistics():
    with pytest.raises(ValueError, match="item statistics"):
        Recaller(popular_share=0.1).fit(np.ones((5, 3), np.float32))


def test_serving_offers_what_evaluation_offers_once_every_news_is_seen():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(301, 8)).astype(np.float32)
    vectors[0] = 0
    popularity = rng.integers(0, 3, 301).astype(float)  # many ties
    first_seen = np.where(rng.random(301) < 0.9, T0 - rng.integers(0, 5, 301) * DAY, NEVER)
    stats = ItemStats(popularity, first_seen, T0, 1.0)
    recaller = Recaller(k=20, popular_share=0.5).fit(vectors, stats=stats)
    history = rng.integers(1, 301, size=(40, 10))
    users = recaller.user_vectors(history)
    served = recaller.search(users, exclude=history)  # a prefix of the channel's order
    evaluated = recaller.search(users, exclude=history, times=np.full(40, T0 + 1))  # a scan
    for a, b in zip(served, evaluated, strict=True):
        np.testing.assert_array_equal(a, b)


def test_merged_scores_are_the_same_when_rescored_a_few_users_at_a_time(monkeypatch):
    import mmnewsrec.recall.recaller as recaller_module

    recaller = channel_recaller()
    users = recaller.user_vectors(np.array([[1], [10], [4], [6], [2]]))
    whole = recaller.search(users)
    monkeypatch.setattr(recaller_module, "SCORE_BLOCK", 4 * 2)  # one user (k=4, D=2) per block
    scores, ids = recaller.search(users)
    np.testing.assert_array_equal(ids, whole[1])
    np.testing.assert_allclose(scores, whole[0], rtol=1e-6)


@pytest.mark.parametrize("backend", ["exact", "faiss_flat", "faiss_hnsw"])
@pytest.mark.parametrize("share", [0.0, 0.25])
def test_one_users_search_is_the_batched_search(backend, share):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(81, 12)).astype(np.float32)
    vectors[0], vectors[60:, 8:] = 0, 0  # news 60.. have no image part
    popularity = rng.integers(0, 3, 81).astype(float)
    first_seen = np.where(rng.random(81) < 0.15, T0, NEVER)  # the channel runs dry at times
    stats = ItemStats(popularity, first_seen, T0, 1.0)
    parts = (Part("text", 0, 8), Part("image", 8, 12))
    recaller = Recaller(k=30, backend=backend, popular_share=share, recency_weighting=0.9)
    recaller.fit(vectors, parts=parts, stats=stats)
    for history in [*rng.integers(1, 81, size=(25, 12)), np.array([5, 5, 7])]:
        exclude = np.unique(history)
        users = recaller.user_vectors((np.array([0, len(history)]), history))
        for k in (30, 7):
            batched = recaller.search(users, k, exclude=(np.array([0, len(exclude)]), exclude))
            scores, ids = recaller.search_one(history, k, exclude)
            np.testing.assert_array_equal(ids, batched[1][0])
            np.testing.assert_allclose(scores, batched[0][0], rtol=1e-5, atol=1e-6)
            assert not np.isin(ids, exclude).any()
