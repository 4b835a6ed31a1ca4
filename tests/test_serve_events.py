"""The live service: POST /events into a durable state, users' histories, the cold-start list,
added news kept across restarts; through FastAPI's test client on a real tiny run."""

import sqlite3
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mmnewsrec.serve import Recommender, create_app
from mmnewsrec.serve.live import open_live
from mmnewsrec.serve.new_news import NewNews
from mmnewsrec.serve.state import SQLiteState, StateError


@pytest.fixture(scope="module")
def rec(tiny_run) -> Recommender:
    return Recommender.from_run(tiny_run)


@pytest.fixture
def server(rec, tmp_path):
    """(client, live) over a fresh state folder; the state is closed after the test."""
    served, live = open_live(rec, tmp_path / "state")
    with TestClient(create_app(served, live=live)) as client:
        yield client, live
    live.state.close()


def restarted(rec, folder):
    served, live = open_live(rec, folder)
    return TestClient(create_app(served, live=live)), live


def logged(folder) -> int:
    with sqlite3.connect(folder / "state.sqlite") as db:
        return db.execute("SELECT count(*) FROM impressions").fetchone()[0]


def event(n: int, user: str, shown: list[str], clicked: list[str], **more) -> dict:
    return {"impression_id": f"I{n}", "user_id": user, "shown": shown, "clicked": clicked} | more


def test_an_event_is_logged_once_and_its_clicks_join_the_users_history(server, rec, tmp_path):
    client, _ = server
    ids = rec.store.news["news_id"].to_list()
    body = event(1, "U-new", ids[:5], [ids[3]], time="2026-12-01T10:00:00Z", history=[ids[7]])
    assert client.post("/events", json=body).json() == {"impression_id": "I1", "stored": True}
    assert client.post("/events", json=body).json() == {"impression_id": "I1", "stored": False}
    assert logged(tmp_path / "state") == 1
    later = event(2, "U-new", ids[5:9], [ids[8], ids[6]], time="2026-12-01T11:00:00+01:00")
    assert client.post("/events", json=later).json()["stored"]
    # 11:00+01:00 is 10:00Z: the clicks of both impressions, in order of time, then of listing
    user = client.get("/users/U-new").json()
    history = [ids[7], ids[3], ids[8], ids[6]]
    titles = [rec.summary(rec.index_of(i)).title for i in history]
    assert user == {"user_id": "U-new", "known": True, "history": history, "titles": titles}
    got = client.post("/recommend", json={"user_id": "U-new", "k": 5}).json()
    assert got["history_used"] == user["history"] and not got["cold_start"]
    expected = rec.recommend(user["history"], k=5)
    assert [i["news_id"] for i in got["items"]] == [i.news_id for i in expected.items]


def test_a_store_user_has_the_store_history_then_the_logged_clicks(server, rec):
    client, live = server
    store = rec.store
    train = store.behaviors("train")
    mine = np.asarray(train.user_index) == train.user_index[0]
    last = int(np.argmax(np.where(mine, train.times, -1)))  # the user's latest train impression
    user = store.user_ids[train.user_index[0]]
    from_store = client.get(f"/users/{user}").json()["history"]
    base = store.news_ids[train.history(last)].tolist()
    assert from_store[: len(base)] == base and len(from_store) >= len(base)
    fresh = next(i for i in store.news_ids[1:] if i not in from_store)
    client.post("/events", json=event(9, user, [fresh], [fresh])).raise_for_status()
    assert client.get(f"/users/{user}").json()["history"] == [*from_store, fresh]


@pytest.mark.parametrize(
    ("change", "loc", "value"),
    [
        ({"shown": ["N-nope"]}, ["body", "shown", 0], "N-nope"),
        ({"clicked": ["X"]}, ["body", "clicked", 0], "X"),
        ({"history": ["N-gone"]}, ["body", "history", 0], "N-gone"),
        ({"shown": []}, ["body", "shown"], []),
        ({"time": "yesterday"}, ["body", "time"], "yesterday"),
        ({"time": "2999-01-01T00:00:00"}, ["body", "time"], "2999-01-01T00:00:00"),
        ({"impression_id": ""}, ["body", "impression_id"], ""),
        ({"user_id": "a b"}, ["body", "user_id"], "a b"),
        ({"extra": 1}, ["body", "extra"], 1),
    ],
)
def test_a_bad_event_gets_a_422_naming_field_and_value_and_nothing_is_stored(
    server, rec, tmp_path, change, loc, value
):
    client, _ = server
    ids = rec.store.news["news_id"].to_list()
    clicked = change.get("clicked", [ids[1]])
    if "clicked" in change:  # X: a known id that was not shown
        clicked = [ids[9]]
        value = ids[9]
    body = event(3, "U3", ids[:4], clicked) | {k: v for k, v in change.items() if k != "clicked"}
    response = client.post("/events", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and e["input"] == value for e in errors), errors
    assert logged(tmp_path / "state") == 0


def test_repeated_ids_are_refused(server, rec, tmp_path):
    client, _ = server
    ids = rec.store.news["news_id"].to_list()
    response = client.post("/events", json=event(4, "U4", [ids[0], ids[1], ids[0]], []))
    assert response.status_code == 422 and ids[0] in response.text and "repeated" in response.text
    batch = [event(5, "U5", ids[:2], []), event(5, "U6", ids[2:4], [])]
    response = client.post("/events/batch", json=batch)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", 1, "impression_id"]
    assert logged(tmp_path / "state") == 0


def test_a_batch_is_stored_whole_or_not_at_all(server, rec, tmp_path):
    client, _ = server
    ids = rec.store.news["news_id"].to_list()
    good = [event(10 + n, f"U{n}", ids[n : n + 3], [ids[n]]) for n in range(20)]
    bad = good[:19] + [event(99, "U99", ids[:3], ["N-nope"])]
    response = client.post("/events/batch", json=bad)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][:2] == ["body", 19]
    assert logged(tmp_path / "state") == 0
    assert client.post("/events/batch", json=good[:5]).json() == {"stored": 5, "duplicates": []}
    again = client.post("/events/batch", json=good).json()
    assert again == {"stored": 15, "duplicates": [f"I{10 + n}" for n in range(5)]}
    assert logged(tmp_path / "state") == 20
    assert client.post("/events/batch", json=[]).status_code == 422


def test_an_unknown_user_gets_a_cold_start_list_that_follows_the_clicks(server, rec):
    client, _ = server
    ids = rec.store.news["news_id"].to_list()
    before = client.post("/recommend", json={"user_id": "U-stranger", "k": 5}).json()
    assert before["cold_start"] and before["history_used"] == []
    assert {i["stage"] for i in before["items"]} == {"popularity"}
    target = next(i for i in ids[::-1] if i not in [x["news_id"] for x in before["items"]])
    end = int(rec.store.behaviors("train").times.max())
    when = np.datetime64(end, "s").astype(str)
    events = [event(100 + n, f"V{n}", [target, ids[n]], [target], time=when) for n in range(30)]
    client.post("/events/batch", json=events).raise_for_status()
    after = client.post("/recommend", json={"user_id": "U-stranger", "k": 5}).json()
    assert after["items"][0]["news_id"] == target and after["cold_start"]
    assert client.get("/users/U-stranger").json() == {
        "user_id": "U-stranger", "known": False, "history": [], "titles": []
    }  # fmt: skip


def test_a_restart_restores_the_users_and_keeps_retries_idempotent(rec, tmp_path):
    folder = tmp_path / "state"
    ids = rec.store.news["news_id"].to_list()
    client, live = restarted(rec, folder)
    body = event(1, "U-r", ids[:4], [ids[2]])
    client.post("/events", json=body).raise_for_status()
    history = client.get("/users/U-r").json()["history"]
    live.state.close()
    client, live = restarted(rec, folder)
    assert client.get("/users/U-r").json()["history"] == history == [ids[2]]
    assert client.post("/events", json=body).json()["stored"] is False
    assert logged(folder) == 1
    live.state.close()


def test_added_news_are_reloaded_with_their_vectors(rec, tmp_path):
    folder = tmp_path / "state"
    served, live = open_live(rec, folder)
    vector = np.asarray(rec.vectors.vectors[5], dtype=np.float32)
    live.state.add_news(NewNews("N-added", "A new title", category="news"), 1_700_000_000, vector)
    live.state.close()
    served, live = open_live(rec, folder)
    index = served.index_of("N-added")
    assert index == rec.num_news + 1 and served.detail(index).title == "A new title"
    np.testing.assert_array_equal(served.recaller.vectors_[index].numpy(), vector)
    assert live.popularity.first_seen[index] == 1_700_000_000
    live.state.close()


def test_a_state_of_other_data_is_refused(rec, tmp_path):
    SQLiteState(tmp_path, {"store": "other", "vectors": rec.vectors.hash}).close()
    with pytest.raises(StateError, match="give the served run its own --state folder"):
        open_live(rec, tmp_path)


def test_a_stateless_server_says_so(rec):
    client = TestClient(create_app(rec))
    assert client.post("/recommend", json={"user_id": "U1"}).status_code == 501
    assert client.post("/events", json=event(1, "U1", ["N1"], [])).status_code == 501


def test_a_returning_users_recall_is_kept_until_their_next_click(server, rec, monkeypatch):
    client, live = server
    ids = rec.store.news["news_id"].to_list()
    client.post("/events", json=event(1, "U-back", ids[:4], [ids[1]])).raise_for_status()
    served = client.app.state.recommender
    searches = []
    search = served.recaller.search_one
    monkeypatch.setattr(
        served.recaller, "search_one", lambda *a, **kw: searches.append(1) or search(*a, **kw)
    )
    first = client.post("/recommend", json={"user_id": "U-back", "k": 5}).json()
    again = client.post("/recommend", json={"user_id": "U-back", "k": 5}).json()
    assert len(searches) == 1 and again["items"] == first["items"]
    clicked = first["items"][0]["news_id"]
    shown = [i["news_id"] for i in first["items"]]
    client.post("/events", json=event(2, "U-back", shown, [clicked])).raise_for_status()
    after = client.post("/recommend", json={"user_id": "U-back", "k": 5}).json()
    assert len(searches) == 2 and clicked not in [i["news_id"] for i in after["items"]]
    assert after["history_used"] == [ids[1], clicked]


def test_a_returning_users_history_encoding_is_kept_until_their_next_click(
    server, rec, monkeypatch
):
    client, _ = server
    ids = rec.store.news["news_id"].to_list()
    client.post("/events", json=event(1, "U-enc", ids[:4], [ids[1], ids[2]])).raise_for_status()
    served = client.app.state.recommender
    ranker, encodings = served.ranker, []
    encode = ranker.encode_history
    monkeypatch.setattr(ranker, "encode_history", lambda h: encodings.append(h) or encode(h))
    first = client.post("/recommend", json={"user_id": "U-enc", "k": 5}).json()
    again = client.post("/recommend", json={"user_id": "U-enc", "k": 5}).json()
    assert len(encodings) == 1 and again["items"] == first["items"]
    clicked = first["items"][0]["news_id"]
    shown = [i["news_id"] for i in first["items"]]
    client.post("/events", json=event(2, "U-enc", shown, [clicked])).raise_for_status()
    after = client.post("/recommend", json={"user_id": "U-enc", "k": 5}).json()
    assert len(encodings) == 2 and after["history_used"] == [ids[1], ids[2], clicked]
    assert after["items"] != first["items"]  # the click changed the next recommendation
    # as computed afresh for the new history (no user: nothing kept), within float32 rounding
    fresh = served.recommend(after["history_used"], k=5)
    assert [i["news_id"] for i in after["items"]] == [i.news_id for i in fresh.items]
    scores = [i["score"] for i in after["items"]]
    np.testing.assert_allclose(scores, [i.score for i in fresh.items], rtol=1e-5, atol=1e-6)
    # encoded again from the new history, not the kept encoding of the one before the click
    assert np.asarray(encodings[1]).ravel().tolist() == [
        rec.index_of(i) for i in after["history_used"]
    ]
    assert np.asarray(encodings[0]).ravel().tolist() != np.asarray(encodings[1]).ravel().tolist()


def test_a_bulk_load_may_pass_the_body_limit_of_other_requests(server, rec, tmp_path):
    client, _ = server
    ids = rec.store.news["news_id"].to_list()
    batch = [event(n, f"user-{n:055d}", ids[n % 50 : n % 50 + 8], []) for n in range(8000)]
    import json

    assert len(json.dumps(batch)) > 1 << 20  # over the limit of every other request
    response = client.post("/events/batch", json=batch)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["stored"] == 8000
    assert logged(tmp_path / "state") == 8000


def test_clicks_logged_out_of_time_order_join_the_history_in_time_order(server, rec):
    client, live = server
    ids = rec.store.news["news_id"].to_list()
    at = {"noon": "2026-12-01T12:00:00Z", "ten": "2026-12-01T10:00:00Z"}
    for n, (when, clicked) in enumerate([("noon", 1), ("ten", 2), ("noon", 3), ("ten", 4)]):
        body = event(n, "U-late", ids[:6], [ids[clicked]], time=at[when])
        client.post("/events", json=body).raise_for_status()
    # by time, then in the order logged among equal times
    expected = [ids[2], ids[4], ids[1], ids[3]]
    assert client.get("/users/U-late").json()["history"] == expected
    live.users.load_arrays(live.users.to_arrays())  # as a snapshot gives them back
    assert client.get("/users/U-late").json()["history"] == expected


def test_a_recommendation_in_a_worker_thread_waits_for_an_event_being_learned(server, rec):
    client, live = server
    ids = rec.store.news["news_id"].to_list()
    client.post("/events", json=event(1, "U-par", ids[:4], [ids[1]])).raise_for_status()
    served, done = client.app.state.recommender, []
    worker = threading.Thread(target=lambda: done.append(live.recommend(served, "U-par", 5, True)))
    with live.lock:  # as `apply` holds it while an event is learned
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not done  # it does not read the state half updated
    worker.join(60)
    assert done and done[0].history_used == [ids[1]]


def test_a_history_encoding_that_failed_is_computed_again(server, rec, monkeypatch):
    client, live = server
    ids = rec.store.news["news_id"].to_list()
    client.post("/events", json=event(1, "U-fail", ids[:4], [ids[1]])).raise_for_status()
    served = client.app.state.recommender
    ranker, calls = served.ranker, []
    encode = ranker.encode_history

    def fails_once(history):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return encode(history)

    monkeypatch.setattr(ranker, "encode_history", fails_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        live.recommend(served, "U-fail", 5, True)
    again = live.recommend(served, "U-fail", 5, True)  # not the failure kept for this history
    assert len(calls) == 2 and len(again.items) == 5
