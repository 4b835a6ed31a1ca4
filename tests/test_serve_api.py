"""The HTTP API through FastAPI's test client, on a real tiny run."""

import dataclasses
from pathlib import Path

import pytest
from conftest import TINY_HISTORY_LEN as HISTORY_LEN
from fastapi.testclient import TestClient

from mmnewsrec.serve import Recommender, ServeSettings, create_app
from mmnewsrec.serve.app import RecommendedOut, RecommendResponse
from mmnewsrec.serve.recommender import Recommendation, RecommendedNews


@pytest.fixture(scope="module")
def rec(tiny_run) -> Recommender:
    return Recommender.from_run(tiny_run)


@pytest.fixture(scope="module")
def client(rec) -> TestClient:
    return TestClient(create_app(rec, ServeSettings(search_limit=5)))


@pytest.fixture(scope="module")
def ids(rec) -> list[str]:
    return rec.store.news["news_id"].to_list()


def image_ids(rec) -> tuple[str, str]:
    """One news id with an image and one without."""
    news = rec.store.news
    has = news["image_path"].is_not_null()
    return news.filter(has)["news_id"][0], news.filter(~has)["news_id"][0]


def test_recommend_happy_path(client, rec, ids):
    response = client.post("/recommend", json={"history": ids[:3], "k": 7})
    assert response.status_code == 200
    body = response.json()
    assert len(body["items"]) == 7 and body["unknown"] == [] and body["history_used"] == ids[:3]
    expected = rec.recommend(ids[:3], k=7)
    assert [i["news_id"] for i in body["items"]] == [i.news_id for i in expected.items]
    first = body["items"][0]
    assert set(first) == {
        "news_id", "title", "category", "subcategory", "has_image", "score", "stage", "recall_rank"
    }  # fmt: skip
    assert first["stage"] == "rerank" and first["recall_rank"] >= 1
    assert {"lookup", "recall", "rerank", "total"} <= set(body["timings_ms"])


def test_recommend_body_is_the_documented_schema(client, rec, ids):
    """The body is written from the dataclasses without a validation pass: it must still be
    exactly RecommendResponse, field for field and in order."""
    for dataclass, model in (
        (Recommendation, RecommendResponse),
        (RecommendedNews, RecommendedOut),
    ):
        assert [f.name for f in dataclasses.fields(dataclass)] == list(model.model_fields)
    response = client.post("/recommend", json={"history": ids[:4], "k": 5})
    assert response.headers["content-type"] == "application/json"
    body = RecommendResponse.model_validate_json(response.content)
    expected = RecommendResponse.model_validate(dataclasses.asdict(rec.recommend(ids[:4], k=5)))
    assert body.model_dump(exclude={"timings_ms"}) == expected.model_dump(exclude={"timings_ms"})
    schema = client.get("/openapi.json").json()["paths"]["/recommend"]["post"]["responses"]
    assert schema["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RecommendResponse"
    )


def test_recommend_reports_unknown_ids(client, ids):
    body = client.post("/recommend", json={"history": [ids[0], "N-nope", "x" * 64]}).json()
    assert body["unknown"] == ["N-nope", "x" * 64] and body["history_used"] == ids[:1]
    assert len(body["items"]) == 10 and body["items"][0]["stage"] == "rerank"


def test_empty_history_gets_popular_news(client):
    for body in ({"history": []}, {}, {"history": ["N-nope"]}):
        items = client.post("/recommend", json=body | {"k": 4}).json()["items"]
        assert [i["stage"] for i in items] == ["popularity"] * 4
        assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)


def test_long_history_is_cut(client, ids):
    history = ids[: HISTORY_LEN + 30]
    body = client.post("/recommend", json={"history": history, "k": 100}).json()
    assert body["history_used"] == history[-HISTORY_LEN:]
    assert not {i["news_id"] for i in body["items"]} & set(history)
    kept = client.post("/recommend", json={"history": history, "exclude_history": False}).json()
    assert kept["history_used"] == history[-HISTORY_LEN:]


@pytest.mark.parametrize(("k", "status"), [(0, 422), (1, 200), (100, 200), (101, 422), (-3, 422)])
def test_k_is_bounded(client, ids, k, status):
    response = client.post("/recommend", json={"history": ids[:2], "k": k})
    assert response.status_code == status
    if status == 200:
        assert len(response.json()["items"]) == k


@pytest.mark.parametrize(
    "body",
    [
        {"history": "N1"},
        {"history": [1, 2]},
        {"history": [None]},
        {"history": [""]},
        {"history": ["x" * 65]},
        {"history": ["N1"] * 1001},
        {"k": "ten"},
        {"k": 2.5},
        {"exclude_history": "maybe"},
        {"history": [], "extra": 1},
        [],
        "N1",
    ],
)
def test_bad_bodies_get_422(client, body):
    assert client.post("/recommend", json=body).status_code == 422


def test_not_json_gets_422(client):
    json_type = {"content-type": "application/json"}
    assert client.post("/recommend", content=b"{history", headers=json_type).status_code == 422
    assert client.get("/recommend").status_code == 405


def test_news_metadata(client, rec, ids):
    body = client.get(f"/news/{ids[4]}").json()
    row = rec.store.news.row(4, named=True)
    for field in ("news_id", "title", "category", "subcategory", "abstract", "url"):
        assert body[field] == row[field]
    assert body["has_image"] == (row["image_path"] is not None)
    assert client.get("/news/N-nope").status_code == 404


def test_image_served_from_the_store_only(client, rec):
    with_image, without = image_ids(rec)
    response = client.get(f"/news/{with_image}/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    path = rec.image_path(rec.index_of(with_image))
    assert response.content == Path(path).read_bytes()
    assert client.get(f"/news/{without}/image").status_code == 404
    assert client.get("/news/N-nope/image").status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "/news/..%2F..%2F..%2Fetc%2Fpasswd/image",
        "/news/%2e%2e/image",
        "/news/..%5C..%5Cetc%5Cpasswd/image",
        "/news/%2Fetc%2Fpasswd/image",
        "/news/N1%00.jpg/image",
        "/news/..%252F..%252Fetc%252Fpasswd/image",
    ],
)
def test_image_path_traversal_is_404(client, url):
    response = client.get(url)
    assert response.status_code == 404
    assert b"root:" not in response.content


def test_search_titles(client, rec):
    body = client.get("/news/search", params={"q": "GOLF", "limit": 50}).json()
    assert 0 < len(body) <= 5  # capped by the settings
    assert all("golf" in item["title"].lower() for item in body)
    assert client.get("/news/search", params={"q": "no such words here"}).json() == []
    assert client.get("/news/search").status_code == 422
    assert client.get("/news/search", params={"q": "golf", "limit": 0}).status_code == 422


def test_health(client, rec):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "fast_rec_transformer"
    assert body["vectors"] == {"dim": 32, "hash": rec.vectors.hash}
    assert body["counts"]["news"] == rec.store.num_news
    assert body["counts"]["news_with_image"] == rec.store.news["image_path"].is_not_null().sum()
    assert body["max_history"] == HISTORY_LEN and body["recall_k"] == 200


def test_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search"' in page.text and "app.js" in page.text
    assert "/recommend" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/nothing-here").status_code == 404
    assert client.get("/static/../recommender.py").status_code == 404


@pytest.mark.parametrize("parallel, on_the_loop", [(1, True), (3, False)])
def test_one_at_a_time_runs_on_the_event_loop(rec, ids, monkeypatch, parallel, on_the_loop):
    import asyncio

    seen = []

    def recommend(*args):
        try:
            asyncio.get_running_loop()
            seen.append(True)
        except RuntimeError:  # a worker thread has no running loop
            seen.append(False)
        return Recommendation([], [], [], {})

    monkeypatch.setattr(rec, "recommend", recommend)
    client = TestClient(create_app(rec, ServeSettings(parallel=parallel)))
    assert client.post("/recommend", json={"history": ids[:2]}).status_code == 200
    assert seen == [on_the_loop]


def test_light_requests_never_hop_to_a_worker_thread(rec, ids):
    """The dependencies and the endpoints that compute little run on the event loop: the app's
    state is read there, never from a worker thread (each hop costs 0.3-0.5 ms of CPU)."""
    import asyncio

    from starlette.datastructures import State

    on_the_loop = []

    class LoopCheckingState(State):
        def __getattr__(self, key):
            try:
                asyncio.get_running_loop()
                on_the_loop.append(True)
            except RuntimeError:  # a worker thread has no running loop
                on_the_loop.append(False)
            return super().__getattr__(key)

    app = create_app(rec)
    names = ("recommender", "settings", "limiter", "news_lock", "news_encoder", "live")
    app.state = LoopCheckingState({name: getattr(app.state, name) for name in names})
    client = TestClient(app)
    assert client.post("/recommend", json={"history": ids[:2]}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get(f"/news/{ids[0]}").status_code == 200
    assert len(on_the_loop) >= 4 and all(on_the_loop)


def test_serve_freezes_the_loaded_run_before_it_listens(tiny_run, monkeypatch):
    """`mmnewsrec serve` hides what it loaded from the garbage collector, whose full
    collection would otherwise walk it (over 100 ms at 100k news) in the middle of requests."""
    import gc

    import uvicorn
    from typer.testing import CliRunner

    from mmnewsrec.cli import app as cli

    frozen = []
    monkeypatch.setattr(uvicorn, "run", lambda service, **_: frozen.append(gc.get_freeze_count()))
    try:
        result = CliRunner().invoke(cli, ["serve", str(tiny_run), "--port", "0"])
    finally:
        gc.unfreeze()
    assert result.exit_code == 0, result.output
    assert len(frozen) == 1 and frozen[0] > 0
