"""The recall space: per-part centring and unit scaling, and the image bias it removes."""

import numpy as np
import pytest
import torch
from test_recall import behaviors

from mmnewsrec.recall import Part, Recaller, RecallSpace, vector_parts

TEXT_DIM, IMAGE_DIM = 16, 32


def biased_corpus(n: int = 600, topics: int = 12, seed: int = 0):
    """Concat vectors [text, image] as the encoders give them: text by topic; half the news
    with an image whose features share a large common component (a high baseline cosine), the
    rest with zeros there. Users click news of their topic whatever its image. Returns the
    vectors (n+1, D), has_image (n+1,) and a labelled split."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, topics, n)
    text = rng.normal(size=(topics, TEXT_DIM))[topic] + 1.5 * rng.normal(size=(n, TEXT_DIM))
    has_image = rng.random(n) < 0.5
    image = np.abs(3.0 + rng.normal(size=(n, IMAGE_DIM)))  # non-negative, like pooled features
    image *= 3 / np.linalg.norm(image, axis=1, keepdims=True)  # longer than the text part
    vectors = np.zeros((n + 1, TEXT_DIM + IMAGE_DIM), np.float32)
    vectors[1:, :TEXT_DIM] = text / np.linalg.norm(text, axis=1, keepdims=True)
    vectors[1:, TEXT_DIM:] = np.where(has_image[:, None], image, 0)
    histories, candidates = [], []
    for user in range(300):
        same = np.flatnonzero(topic == user % topics) + 1
        picked = rng.choice(same, 8, replace=False)
        histories.append(picked[:5].tolist())
        others = rng.choice(np.flatnonzero(topic != user % topics) + 1, 3, replace=False)
        candidates.append([(i, 1) for i in picked[5:]] + [(i, 0) for i in others])
    return vectors, np.concatenate([[False], has_image]), behaviors(histories, candidates)


def test_centred_parts_recall_news_with_images_as_often_as_they_are_clicked():
    vectors, has_image, split = biased_corpus()
    clicked = split.candidate_items[split.candidate_labels == 1]
    clicked_share = has_image[clicked].mean()
    parts = vector_parts({"fusion": {"method": "concat", "text_dim": TEXT_DIM}}, vectors.shape[1])
    cosine = Recaller(centre_parts=False).fit(vectors).recall_stats(split, [20], has_image)[20]
    centred = Recaller().fit(vectors, parts=parts).recall_stats(split, [20], has_image)[20]
    assert cosine["image_share"] > clicked_share + 0.25  # the bias of a plain cosine
    assert abs(centred["image_share"] - clicked_share) < 0.05
    assert centred["recall"] > cosine["recall"]


def test_rows_are_centred_unit_parts_times_their_weights():
    vectors, has_image, _ = biased_corpus(n=50, topics=2)
    parts = (Part("text", 0, TEXT_DIM), Part("image", TEXT_DIM, TEXT_DIM + IMAGE_DIM))
    matrix = torch.from_numpy(vectors)
    space = RecallSpace(parts, weights={"image": 0.5}).fit(matrix)
    rows = space.rows(matrix, torch.arange(51)).numpy()
    image_mean = vectors[has_image, TEXT_DIM:].mean(0)
    centred = vectors[has_image, TEXT_DIM:] - image_mean
    expected = 0.5 * centred / np.linalg.norm(centred, axis=1, keepdims=True)
    np.testing.assert_allclose(rows[has_image, TEXT_DIM:], expected, atol=1e-5)
    assert not rows[~has_image, TEXT_DIM:].any()  # a missing image stays zero: the average
    np.testing.assert_allclose(np.linalg.norm(rows[1:, :TEXT_DIM], axis=1), 1.0, atol=1e-5)
    assert not rows[0].any()  # padding
    users = torch.randn(3, TEXT_DIM + IMAGE_DIM)
    np.testing.assert_allclose(space.scores(users, matrix).numpy(), users @ rows.T, atol=1e-5)
    ids = torch.tensor(
        [[3, 0, 7], [50, 1, 1], [2, 9, 4]]
    )  # a few rows per user, from the plain rows
    expected = np.take_along_axis((users @ rows.T).numpy(), ids.numpy(), 1)
    np.testing.assert_allclose(space.score_rows(users, matrix, ids).numpy(), expected, atol=1e-5)


def test_plain_cosine_without_centring_and_parts_from_the_manifest():
    assert vector_parts({"fusion": {"method": "concat", "text_dim": 4}}, 10) == (
        Part("text", 0, 4),
        Part("image", 4, 10),
    )
    assert vector_parts({"fusion": {"method": "mean"}}, 8) == (Part("all", 0, 8),)
    matrix = torch.randn(6, 8)
    space = RecallSpace((Part("all", 0, 8),), centre=False).fit(matrix)
    unit = matrix[1:] / matrix[1:].norm(dim=1, keepdim=True)
    torch.testing.assert_close(space.rows(matrix, torch.arange(1, 6)), unit)
    assert space.key == "raw-all1"


@pytest.mark.parametrize("backend", ["exact", "faiss_flat", "faiss_hnsw"])
def test_every_backend_searches_the_same_space(backend):
    vectors, _, _ = biased_corpus(n=400, seed=1)
    parts = vector_parts({"fusion": {"method": "concat", "text_dim": TEXT_DIM}}, vectors.shape[1])
    recaller = Recaller(k=10, backend=backend).fit(vectors, parts=parts)
    history = np.random.default_rng(2).integers(1, 401, size=(30, 5))
    users = recaller.user_vectors(history)
    rows = recaller.space_.rows(recaller.vectors_, torch.arange(1, 401)).numpy()
    scores, found = recaller.search(users, exclude=history)
    truth = users @ rows.T
    np.testing.assert_allclose(scores, np.take_along_axis(truth, found - 1, 1), atol=1e-5)
    for row, past in zip(truth, history, strict=True):
        row[past - 1] = -np.inf
    best = -np.sort(-truth, axis=1)[:, :10]
    tolerance = 1e-5 if backend != "faiss_hnsw" else 0.05  # HNSW is approximate
    assert np.mean(np.abs(scores - best) < 1e-5) >= 1 - tolerance
