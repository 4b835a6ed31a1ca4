import numpy as np
import pytest
import torch

from mmnewsrec.formats.store import Behaviors
from mmnewsrec.recall import EXACT_MAX_NEWS, Recaller
from mmnewsrec.recall.channels import ItemStats
from mmnewsrec.recall.space import Part


def random_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n+1, dim) float16 like the encoder's output, row 0 = padding."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n + 1, dim)).astype(np.float16)
    vectors[0] = 0
    return vectors


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_top_k(indices: np.ndarray, scores: np.ndarray, cosine: np.ndarray) -> None:
    """`indices` (1-based) and `scores` are a top-k of each row of `cosine` (0-based columns).

    Search and reference multiply in different kernels, so near-ties (within 1e-5) may swap: the
    i-th result must have the i-th best cosine, not necessarily the reference's i-th index.
    """
    k = indices.shape[1]
    assert all(len(set(row)) == k for row in indices.tolist())
    found = np.take_along_axis(cosine, indices - 1, axis=1)
    np.testing.assert_allclose(scores, found, rtol=0, atol=1e-5)
    np.testing.assert_allclose(found, -np.sort(-cosine, axis=1)[:, :k], rtol=0, atol=1e-5)


def behaviors(histories: list[list[int]], candidates: list[list[tuple[int, int]]]) -> Behaviors:
    """A labelled split from per-impression histories and (news, label) candidates."""
    n = len(histories)
    return Behaviors(
        split="dev",
        labelled=True,
        impression_ids=np.arange(1, n + 1),
        user_index=np.arange(n),
        times=np.zeros(n),
        history_offsets=np.cumsum([0] + [len(h) for h in histories]),
        history_items=np.array([i for h in histories for i in h], dtype=np.int32),
        candidate_offsets=np.cumsum([0] + [len(c) for c in candidates]),
        candidate_items=np.array([i for c in candidates for i, _ in c], dtype=np.int32),
        candidate_labels=np.array([label for c in candidates for _, label in c], dtype=np.int8),
    )


def test_user_vectors_are_the_mean_of_unit_click_vectors():
    vectors = random_vectors(20, 8)
    recaller = Recaller(centre_parts=False, k=5).fit(vectors)
    padded = np.array([[0, 0, 3, 7], [1, 2, 3, 4], [0, 0, 0, 0]])
    users = recaller.user_vectors(padded)
    expected = unit(unit(vectors[[3, 7]]).mean(0))
    np.testing.assert_allclose(users[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(users[2], 0)  # no clicks: zero vector
    csr = (np.array([0, 2, 6, 6]), np.array([3, 7, 1, 2, 3, 4]))
    np.testing.assert_allclose(recaller.user_vectors(csr), users, atol=1e-6)


def test_recency_weighting_favours_recent_clicks():
    vectors = random_vectors(20, 8)
    recaller = Recaller(centre_parts=False, recency_weighting=0.5).fit(vectors)
    users = recaller.user_vectors(np.array([[0, 3, 7, 9]]))
    clicks = unit(vectors[[3, 7, 9]])
    expected = unit(0.25 * clicks[0] + 0.5 * clicks[1] + clicks[2])
    np.testing.assert_allclose(users[0], expected, rtol=1e-5, atol=1e-6)


def test_exact_search_matches_brute_force_and_excludes():
    vectors = random_vectors(300, 16)
    recaller = Recaller(centre_parts=False, k=10, backend="exact").fit(vectors)
    history = np.array([[0, 5, 6], [1, 2, 3]])
    users = recaller.user_vectors(history)
    cosine = users @ unit(vectors[1:]).T  # (2, 300), index = column + 1
    scores, indices = recaller.search(users)
    assert scores.shape == indices.shape == (2, 10)
    assert_top_k(indices, scores, cosine)
    _, kept = recaller.search(users, k=300, exclude=history)
    assert not np.isin(kept[0], [5, 6]).any() and not np.isin(kept[1], [1, 2, 3]).any()
    assert (kept[0, :298] > 0).all() and (kept[0, 298:] == 0).all()  # 0 = no result left
    assert len(set(kept[1, :297])) == 297 and (kept[1, 297:] == 0).all()


def test_more_than_the_corpus_returns_padding_markers():
    recaller = Recaller(centre_parts=False, backend="exact").fit(random_vectors(5, 4))
    scores, indices = recaller.search(recaller.user_vectors(np.array([[1]])), k=9, exclude=[[1]])
    assert indices.shape == (1, 5)
    assert sorted(indices[0, :4]) == [2, 3, 4, 5] and indices[0, 4] == 0
    assert scores[0, 4] == -np.inf


@pytest.mark.parametrize("exclude", [False, True])
def test_faiss_flat_equals_exact(exclude):
    vectors = random_vectors(2000, 32, seed=1)
    rng = np.random.default_rng(2)
    history = rng.integers(0, 2001, size=(50, 20))
    exact = Recaller(centre_parts=False, k=20, backend="exact").fit(vectors)
    flat = Recaller(centre_parts=False, k=20, backend="faiss_flat", batch_size=16).fit(vectors)
    users = exact.user_vectors(history)
    cosine = users @ unit(vectors[1:]).T
    ex = history if exclude else None
    if exclude:
        rows = np.repeat(np.arange(len(history)), history.shape[1])
        kept = history.ravel() > 0
        cosine[rows[kept], history.ravel()[kept] - 1] = -np.inf
    for backend in (exact, flat):
        assert_top_k(*backend.search(users, exclude=ex)[::-1], cosine)


def test_hnsw_recall_is_high():
    vectors = random_vectors(5000, 32, seed=3)
    history = np.random.default_rng(4).integers(1, 5001, size=(200, 10))
    exact = Recaller(centre_parts=False, k=10, backend="exact").fit(vectors)
    hnsw = Recaller(centre_parts=False, k=10, backend="faiss_hnsw").fit(vectors)
    users = exact.user_vectors(history)
    truth, found = exact.search(users, exclude=history)[1], hnsw.search(users, exclude=history)[1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    assert overlap > 0.95


def test_hnsw_rescores_exactly_and_leaves_the_index_unchanged():
    vectors = random_vectors(3000, 32, seed=5)
    hnsw = Recaller(centre_parts=False, k=50, backend="faiss_hnsw", hnsw_ef_search=16).fit(vectors)
    history = np.random.default_rng(6).integers(1, 3001, size=(20, 40))
    users = hnsw.user_vectors(history)
    scores, found = hnsw.search(users, k=200, exclude=history)
    cosine = users @ unit(vectors[1:]).T
    exact = np.take_along_axis(cosine, found - 1, axis=1)
    np.testing.assert_allclose(scores, exact, rtol=0, atol=1e-5)  # not the 8-bit codes' scores
    assert (np.diff(scores, axis=1) <= 0).all()
    assert not any(np.isin(f, h).any() for f, h in zip(found, history, strict=True))
    # the search widened efSearch for itself only: concurrent requests share the index
    assert hnsw.index_.hnsw.efSearch == 16


def test_hnsw_index_is_saved_and_read_back(tmp_path, monkeypatch):
    vectors = random_vectors(500, 16, seed=7)
    users = Recaller(centre_parts=False).fit(vectors).user_vectors(np.array([[1, 2, 3], [4, 5, 0]]))
    built = Recaller(centre_parts=False, k=20, backend="faiss_hnsw").fit(vectors, tmp_path, "abc")
    assert [p.name for p in tmp_path.iterdir()] == ["hnsw32-sq8-raw-all1-abc.faiss"]

    def no_build(self):
        raise AssertionError("built again")

    monkeypatch.setattr(Recaller, "_build_index", no_build)
    read = Recaller(centre_parts=False, k=20, backend="faiss_hnsw").fit(vectors, tmp_path, "abc")
    for a, b in zip(built.search(users), read.search(users), strict=True):
        np.testing.assert_array_equal(a, b)  # the same graph and codes, the same kernels
    with pytest.raises(AssertionError, match="built again"):
        other = random_vectors(400, 16)
        Recaller(centre_parts=False, backend="faiss_hnsw").fit(other, tmp_path, "abc")


def test_a_float32_matrix_is_shared_not_copied():
    vectors = torch.zeros(101, 8)
    vectors[1:] = torch.from_numpy(unit(random_vectors(100, 8)[1:]) * 3)
    recaller = Recaller(centre_parts=False, k=5).fit(vectors)
    assert recaller.vectors_.data_ptr() == vectors.data_ptr()
    np.testing.assert_allclose(recaller.user_vectors(np.array([[4]]))[0], unit(vectors[4].numpy()))


def test_auto_backend_by_corpus_size():
    """One threshold for evaluation and serving: both build a default Recaller."""
    assert Recaller().fit(random_vectors(EXACT_MAX_NEWS, 4)).backend_ == "exact"
    assert Recaller().fit(random_vectors(EXACT_MAX_NEWS + 1, 4)).backend_ == "faiss_hnsw"
    assert EXACT_MAX_NEWS == 20_000  # an exact scan at 100k news is over serving's budget
    vectors = random_vectors(50, 4)
    assert Recaller().fit(vectors).backend_ == "exact"
    assert Recaller(exact_max_news=10).fit(vectors).backend_ == "faiss_hnsw"
    with pytest.raises(ValueError, match="backend"):
        Recaller(backend="annoy").fit(vectors)
    with pytest.raises(ValueError, match="recency_weighting"):
        Recaller(recency_weighting=1.5).fit(vectors)


@pytest.mark.filterwarnings("error")
def test_recall_at_k_reads_read_only_arrays_without_warnings():
    split = behaviors(histories=[[1], [2, 3]], candidates=[[(4, 1), (5, 0)], [(6, 1)]])
    for name in ("history_offsets", "history_items", "candidate_offsets", "candidate_labels"):
        getattr(split, name).flags.writeable = False  # as memory-mapped from a store
    assert 0 <= Recaller(k=2).fit(random_vectors(8, 4)).recall_at_k(split) <= 1


def test_recall_at_k_on_a_hand_built_case():
    # News 1..8 on four axes, {1, 2} axis 0 ... {7, 8} axis 3, tilted by 0.01 * index, so
    # the first off-axis news of every user is news 8 (largest tilt).
    vectors = np.zeros((9, 4), np.float32)
    vectors[1:] = np.repeat(np.eye(4), 2, axis=0) + 0.01 * np.arange(1, 9)[:, None]
    split = behaviors(
        histories=[[1], [3], []],
        # top-2 without the history: user 0 {2, 8}, user 1 {4, 8}; clicks 2 and 4 are found,
        # 5 and 6 are not. User 2 has no history and no click.
        candidates=[[(2, 1), (5, 1), (6, 0)], [(4, 1), (6, 1)], [(7, 0)]],
    )
    recaller = Recaller(centre_parts=False, k=2).fit(vectors)
    assert recaller.recall_at_k(split) == pytest.approx(2 / 4)
    assert recaller.recall_at_k(split, k=8) == 1.0
    flat = Recaller(centre_parts=False, k=2, backend="faiss_flat", batch_size=1).fit(vectors)
    assert flat.recall_at_k(split) == pytest.approx(2 / 4)
    # without excluding the history, news 1 takes one of user 0's two places
    top = recaller.search(recaller.user_vectors(np.array([[1]])), k=2)[1]
    assert top[0, 0] == 1
    with pytest.raises(ValueError, match="unlabelled"):
        split.labelled = False
        recaller.recall_at_k(split)


@pytest.mark.parametrize("backend", ["exact", "faiss_hnsw"])
def test_appended_rows_are_recalled_and_the_original_recaller_is_unchanged(backend):
    vectors = torch.from_numpy(random_vectors(600, 16, seed=8).astype(np.float32))
    parts = (Part("text", 0, 10), Part("image", 10, 16))
    stats = ItemStats(np.arange(601.0), np.zeros(601, dtype=np.int64), end=0, half_life_days=1)
    recaller = Recaller(k=5, backend=backend, popular_share=0.4)
    recaller.fit(vectors, parts=parts, stats=stats)
    users = recaller.user_vectors(np.array([[7], [8]]))
    before = recaller.search(users, exclude=[[7], [8]])
    copy_of = vectors[[7, 8]].clone()
    copy_of[1, 10:] = 0  # no image part
    grown = recaller.appended(copy_of)
    assert recaller.num_news_ == 600 and len(recaller.space_.scales_) == 601
    assert len(recaller.vectors_) == len(recaller.channel_) == len(recaller.first_seen_) == 601
    if backend == "faiss_hnsw":  # the fitted index stays; the copy's takes later news itself
        assert recaller.index_.ntotal == 600 and grown.index_.ntotal == 602
        again = grown.appended(copy_of[:1])
        assert again.index_ is grown.index_ and grown.index_.ntotal == 603
    # a copy of a news item scores as the item: first for a user who clicked only the item
    scores, found = grown.search(grown.user_vectors(np.array([[7], [8]])), exclude=[[7], [8]])
    assert found[:, 0].tolist() == [601, 602]
    torch.testing.assert_close(grown.space_.scales_[601], recaller.space_.scales_[7])
    assert grown.space_.scales_[602, 1] == 0
    # the channel never offers the new news (no clicks); the fitted space keeps its means
    assert not np.isin(found[:, 3:], [601, 602]).any()
    assert grown.space_.means_ is recaller.space_.means_
    for old, again in zip(before, recaller.search(users, exclude=[[7], [8]]), strict=True):
        np.testing.assert_array_equal(old, again)
    with pytest.raises(ValueError, match="rows of width"):
        grown.appended(vectors[:2, :8])
