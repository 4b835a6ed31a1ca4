"""POST /news: a news item added while serving, encoded as the run's news were, recommended by
the next request; on a frozen run (MiniLM text + an image part) and a fine-tuned one."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import with_random_image_part
from fastapi.testclient import TestClient

from mmnewsrec.config import load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.encode.pipeline import EncodeConfig, encode_store, news_texts
from mmnewsrec.rank.train import run_training
from mmnewsrec.serve import Recommender, ServeSettings, create_app

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
