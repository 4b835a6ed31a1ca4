"""POST /news: a news item added while serving, encoded as the run's news were, recommended by
the next request; on a frozen run (MiniLM text + an image part) and a fine-tuned one. Added news
write only their own rows and serve as news restored at start do."""

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import with_random_image_part
from fastapi.testclient import TestClient

from mmnewsrec.config import load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.encode.pipeline import EncodeConfig, encode_store, news_texts
from mmnewsrec.formats.store import Store
from mmnewsrec.formats.vectors import NewsVectors
from mmnewsrec.rank import load_ranker
from mmnewsrec.rank.model import IMAGE_RANK, build_model
from mmnewsrec.rank.train import run_training
from mmnewsrec.serve import Recommender, ServeSettings, create_app
from mmnewsrec.serve.live import open_live
from mmnewsrec.serve.new_news import NewNews

FIELDS = ("title", "abstract", "category", "subcategory", "url")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A frozen run on MiniLM text + random image vectors, a fine-tuned run on MiniLM text."""
    root = tmp_path_factory.mktemp("serve-news")
    generate(root / "data", SynthConfig.quick())
    build_store(root / "data", root / "store")
    text = encode_store(root / "store", root / "emb", EncodeConfig(image_encoder="none"))
    with_random_image_part(text, root / "emb_concat")
    common = {
        "data.store_dir": root / "store",
        "data.history_len": 8,
        "run.max_steps": 3,
        "run.progress": False,
        "run.eval_each_epoch": False,
        "optim.epochs": 1,
        "optim.batch_size": 16,
        "model.args": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1},
    }
    frozen = {"data.vectors_dir": root / "emb_concat", "run.out_dir": root / "frozen"}
    tuned = {"data.vectors_dir": root / "emb", "run.out_dir": root / "tuned"}
    tuned |= {"model.finetune_layers": 1, "model.finetune_lr": 1e-3}
    for values in (frozen, tuned):
        run_training(load_config("train_cpu", values=common | values))
    return {"frozen": root / "frozen", "tuned": root / "tuned"}


def test_training_reduces_the_image_part_by_default(runs):
    model = load_ranker(runs["frozen"]).model
    text_dim = model.config.text_dim
    assert model.model_args["image_rank"] == IMAGE_RANK
    assert model.content_parts == [(0, text_dim, 0), (text_dim, model.news_dim, IMAGE_RANK)]
    basis = model.content_basis
    assert basis[text_dim:].abs().sum() > 0 and not basis[:text_dim].any()


def copy_of_a_news_item(rec: Recommender, news_id: str) -> tuple[str, dict]:
    """(the id of a news item without an image whose text no other item has, a body for
    POST /news that repeats it under `news_id`)."""
    news = rec.store.news
    texts = news_texts(news, rec.vectors.manifest["text"]["fields"])
    unique = ~texts.is_duplicated().to_numpy() & ~np.array(rec.vectors.has_image[1:])
    row = news.filter(unique).row(0, named=True)
    return row["news_id"], {"news_id": news_id} | {f: row[f] or "" for f in FIELDS}


@pytest.mark.parametrize("kind", ["frozen", "tuned"])
def test_a_posted_news_item_is_encoded_as_the_runs_news_and_recommended_next(runs, kind):
    rec = Recommender.from_run(runs[kind], recall_k=20)
    client = TestClient(create_app(rec))
    source, body = copy_of_a_news_item(rec, "NEW1")
    response = client.post("/news", json=body)
    assert response.status_code == 201, response.text
    out = response.json()
    assert {k: out[k] for k in body} == body and out["has_image"] is False
    served = client.app.state.recommender
    new = served.index_of("NEW1")
    assert new == rec.store.num_news + 1 and rec.index_of("NEW1") == 0  # the old one unchanged
    assert len(rec.recaller.vectors_) == new
    # the same text as `source`, so the same vector (encoded alone, not in a batch: float16)
    matrix = served.recaller.vectors_
    np.testing.assert_allclose(matrix[new], matrix[rec.index_of(source)], atol=2e-3)
    assert served.ranker.model.news_vectors is matrix  # the news matrix is held once
    categories = served.ranker.model.news_categories  # the same names, so the same ids
    assert (categories[new] > 0).all() and (
        categories[new] == categories[rec.index_of(source)]
    ).all()
    answer = client.post("/recommend", json={"history": [source], "k": 20}).json()
    found = {item["news_id"]: item for item in answer["items"]}
    assert found["NEW1"]["recall_rank"] == 1 and found["NEW1"]["stage"] == "rerank"
    assert client.get("/news/NEW1").json()["title"] == body["title"]
    assert client.get("/health").json()["counts"]["added_news"] == 1
    assert client.post("/news", json=body).status_code == 409


def test_an_image_is_refused_when_the_vectors_have_an_image_part(runs):
    frozen = TestClient(create_app(Recommender.from_run(runs["frozen"])))
    _, body = copy_of_a_news_item(frozen.app.state.recommender, "NEW2")
    response = frozen.post("/news", json=body | {"image_url": "http://x/y.jpg"})
    assert response.status_code == 422 and "image part" in response.text
    assert frozen.app.state.recommender.index_of("NEW2") == 0
    tuned = TestClient(create_app(Recommender.from_run(runs["tuned"])))  # text only: ignored
    response = tuned.post("/news", json=body | {"image_url": "http://x/y.jpg"})
    assert response.status_code == 201 and response.json()["has_image"] is False


def test_concurrent_posts_all_land(runs):
    settings = ServeSettings(parallel=4)  # the POSTs run at once, but for the app's lock
    client = TestClient(create_app(Recommender.from_run(runs["tuned"]), settings))
    _, body = copy_of_a_news_item(client.app.state.recommender, "C")
    bodies = [body | {"news_id": f"C{i}", "title": f"title {i}"} for i in range(4)]
    with client, ThreadPoolExecutor(4) as pool:  # one event loop, as a server has
        codes = list(pool.map(lambda b: client.post("/news", json=b).status_code, bodies))
    assert codes == [201] * 4
    served = client.app.state.recommender
    assert sorted(served.index_of(f"C{i}") for i in range(4)) == list(
        range(served.store.num_news + 1, served.store.num_news + 5)
    )


def test_vectors_without_a_text_model_part_cannot_take_new_news(tiny_run):
    client = TestClient(create_app(Recommender.from_run(tiny_run)))
    response = client.post("/news", json={"news_id": "NEW3", "title": "a title"})
    assert response.status_code == 501 and "text-model part" in response.text


@pytest.mark.parametrize("field", ["text_dim", "method"])
def test_a_malformed_fusion_entry_is_named_with_its_file(runs, field):
    rec = Recommender.from_run(runs["frozen"], recall_k=20)
    rec.vectors.manifest["fusion"] = dict(rec.vectors.manifest["fusion"])
    del rec.vectors.manifest["fusion"][field]
    client = TestClient(create_app(rec))
    response = client.post("/news", json={"news_id": "BAD1", "title": "a title"})
    detail = response.json()["detail"]
    assert response.status_code == 500 and "manifest.json" in detail and field in detail
    assert rec.index_of("BAD1") == 0 and client.get("/health").status_code == 200


def new_items(rec: Recommender, count: int, seed: int = 0) -> list[tuple[NewNews, np.ndarray]]:
    """`count` news to add: each a store news item's vector plus noise, rounded to float16 as
    encoded vectors are."""
    rng = np.random.default_rng(seed)
    matrix = np.asarray(rec.vectors.vectors, dtype=np.float32)
    rows = matrix[rng.integers(1, rec.store.num_news + 1, count)]
    rows = (rows + 0.1 * rows.std() * rng.normal(size=rows.shape)).astype(np.float16)
    return [
        (NewNews(f"ADD{i}", f"added item {i}", category="news"), row.astype(np.float32))
        for i, row in enumerate(rows)
    ]


def tiny_recommender(run: Path, kind: str) -> Recommender:
    """The tiny run's traced reranker over exact or flat-index recall, or a mean_cosine
    ranker on its vectors (recall-space scales per news item)."""
    if kind != "mean_cosine":
        return Recommender.from_run(run, recall_k=30, recall_backend=kind)
    trained = load_ranker(run)
    vectors = NewsVectors.load(trained.config.data.vectors_dir)
    model = build_model("mean_cosine", None, vectors.vectors, np.array(vectors.has_image))
    ranker = dataclasses.replace(trained, model=model.eval())
    return Recommender(Store.load(trained.config.data.store_dir), vectors, ranker, recall_k=30)


def storages(tables: list[torch.Tensor]) -> int:
    """How many buffers these tensors live in."""
    return len({t.untyped_storage().data_ptr() for t in tables})


def same_recommendations(a: Recommender, b: Recommender, histories: list[list[str]]) -> None:
    """The same news in the same order from the same stages, scores within 1e-5 (a new news
    item's token computed alone or with others: float32 rounding)."""
    for history in histories:
        one, other = a.recommend(history, k=10), b.recommend(history, k=10)
        assert [(i.news_id, i.stage) for i in one.items] == [
            (i.news_id, i.stage) for i in other.items
        ], history
        np.testing.assert_allclose(
            [i.score for i in one.items], [i.score for i in other.items], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("kind", ["exact", "faiss_flat", "mean_cosine"])
def test_news_added_one_at_a_time_write_only_their_rows_and_serve_as_if_added_at_start(
    tiny_run, kind
):
    rec = tiny_recommender(tiny_run, kind)
    items = new_items(rec, 40)
    snapshots = [rec]
    for news, vector in items:
        snapshots.append(snapshots[-1].with_news(news, vector))
    served = snapshots[-1]
    model = served.ranker.model
    assert model.news_vectors is served.recaller.vectors_  # still one matrix for both
    # 501 rows, then room for 1,002: one copy of each per-news table for the 40 news
    per_news = [lambda r: r.recaller.vectors_, lambda r: r.recaller.space_.scales_]
    per_news += [lambda r: r.clicks, lambda r: r.recaller.channel_]
    for table in per_news:
        views = [table(r) for r in snapshots]
        assert storages([torch.as_tensor(v) for v in views]) == 2
        assert [len(v) for v in views] == list(range(len(views[0]), len(views[0]) + 41))
    for name, tokens in model.news_tables().items():
        assert len(tokens) == served.num_news + 1, name
    if kind == "faiss_flat":
        assert served.recaller.index_.ntotal == served.num_news
        assert rec.recaller.index_.ntotal == rec.num_news  # the fitted index stays as it was
    assert served.ranker.traced is rec.ranker.traced  # not traced again
    assert rec.num_news == rec.store.num_news and rec.index_of("ADD0") == 0
    assert rec.recommend(["ADD0"]).unknown == ["ADD0"]  # the first one serves its news only
    # a server started with these news (as a restart restores them: all at once)
    restarted = tiny_recommender(tiny_run, kind).with_news_batch(items)
    ids = rec.store.news["news_id"].to_list()
    histories = [["ADD3"], ["ADD17", "ADD39", ids[4]], ids[10:14], [ids[20], "ADD0"]]
    same_recommendations(served, restarted, histories)
    found = {item.news_id for h in histories for item in served.recommend(h, k=30).items}
    assert found & {news.news_id for news, _ in items}  # the new news are recommended


def test_requests_during_additions_see_whole_news_items_only(tiny_run):
    """Readers on another thread, on whichever recommender is current, while news are added
    to the live FAISS index and tables: every item they get has its metadata, none is
    beyond their recommender's news, nothing fails."""
    rec = Recommender.from_run(tiny_run, recall_k=30, recall_backend="faiss_flat")
    items, current, done = new_items(rec, 80, seed=1), [rec], threading.Event()

    def add() -> None:
        for news, vector in items:
            current.append(current[-1].with_news(news, vector))
        done.set()

    def read() -> int:
        reads = 0
        while not done.is_set() or reads < 5:
            served = current[-1]
            latest = served.news_ids_of([served.num_news])
            result = served.recommend([*latest, *served.news_ids_of([3, 9])], k=10)
            for item in result.items:
                index = served.index_of(item.news_id)
                assert 0 < index <= served.num_news and item.title
            reads += 1
        return reads

    with ThreadPoolExecutor(3) as pool:
        readers = [pool.submit(read) for _ in range(2)]
        pool.submit(add).result()
        assert all(reader.result() >= 5 for reader in readers)
    assert current[-1].recommend(["ADD79"], k=1).items[0].news_id != "ADD79"  # excluded


def test_news_added_to_an_older_recommender_do_not_reach_the_later_one(tiny_run):
    rec = Recommender.from_run(tiny_run, recall_k=30, recall_backend="faiss_flat")
    (a, vector_a), (b, vector_b) = new_items(rec, 2, seed=2)
    first = rec.with_news(a, vector_a)
    second = first.with_news(b, vector_b)
    other = first.with_news(dataclasses.replace(b, news_id="OTHER"), vector_a)  # not the latest
    assert second.index_of("OTHER") == 0 and other.index_of(b.news_id) == 0
    assert other.index_of("OTHER") == second.index_of(b.news_id) == rec.num_news + 2
    np.testing.assert_array_equal(other.recaller.vectors_[-1].numpy(), vector_a)
    np.testing.assert_array_equal(second.recaller.vectors_[-1].numpy(), vector_b)
    assert other.recaller.index_.ntotal == second.recaller.index_.ntotal == rec.num_news + 2
    assert other.ranker.model is not second.ranker.model  # each its own per-news tables
    again = rec.with_news_batch([(b, vector_b)])  # the first one, again
    assert again.index_of(b.news_id) == rec.num_news + 1 and again.index_of(a.news_id) == 0
    history = [a.news_id, b.news_id]
    assert second.recommend(history).history_used == history
    assert other.recommend(history).unknown == [b.news_id]


@pytest.mark.parametrize("kind", ["frozen", "tuned"])
def test_news_posted_one_at_a_time_are_served_after_a_restart_as_before_it(runs, kind, tmp_path):
    rec = Recommender.from_run(runs[kind], recall_k=20)
    served, live = open_live(rec, tmp_path / "state")
    client = TestClient(create_app(served, live=live))
    source, body = copy_of_a_news_item(rec, "X0")
    words = ["today", "again", "live", "update", "late"]
    for i, word in enumerate(words):
        posted = body | {"news_id": f"X{i}", "title": f"{body['title']} {word}"}
        assert client.post("/news", json=posted).status_code == 201
    now = client.app.state.recommender
    assert now.num_news == rec.num_news + 5 and now.ranker.traced is rec.ranker.traced
    live.state.close()
    restarted, again = open_live(Recommender.from_run(runs[kind], recall_k=20), tmp_path / "state")
    try:
        same_recommendations(now, restarted, [["X1"], [source, "X3"], [source], ["X4", "X0"]])
    finally:
        again.state.close()
