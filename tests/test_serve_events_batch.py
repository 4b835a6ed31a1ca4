"""POST /events/batch: the columnar path of a bulk load (msgspec's decoding, the checks over the
whole batch) against the per-impression path, and the bodies it hands to pydantic."""

import json
import sqlite3
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from test_serve_signals import assert_same_signals

from mmnewsrec.serve import Recommender, create_app
from mmnewsrec.serve import live as live_module
from mmnewsrec.serve.events import event_times, parse_time
from mmnewsrec.serve.export import split_events
from mmnewsrec.serve.live import BulkLookup, open_live

PLAIN = {"content-type": "application/vnd.api+json"}  # JSON to FastAPI, not to msgspec


@pytest.fixture(scope="module")
def rec(tiny_run) -> Recommender:
    return Recommender.from_run(tiny_run)


@pytest.fixture
def servers(rec, tmp_path):
    """Two servers, each over a fresh state folder: (client, live, folder) each."""
    made = []
    for name in ("one", "two"):
        served, live = open_live(rec, tmp_path / name)
        made.append((TestClient(create_app(served, live=live)), live, tmp_path / name))
    yield made
    for _, live, _ in made:
        live.state.close()


def rows(folder) -> list[tuple]:
    with sqlite3.connect(folder / "state.sqlite") as db:
        return db.execute("SELECT * FROM impressions ORDER BY seq").fetchall()


def replay_events(rec) -> list[dict]:
    """The train split as events, with times in every form a client may send."""
    events = split_events(rec.store, "train")[:60]
    events[3]["time"] += "Z"
    events[4]["time"] = events[4]["time"].replace("T", " ")
    events[5]["time"] = datetime.fromisoformat(events[5]["time"]).isoformat() + "+01:00"
    events[6]["time"] = events[6]["time"][:10]
    return events


def test_a_batch_stores_and_learns_what_single_events_do(servers, rec):
    (single, one, first), (bulk, two, second) = servers
    events = replay_events(rec)
    retried = events[10:20]  # sent again: not stored, not counted again
    for body in [*events[:40], *retried, *events[40:]]:
        single.post("/events", json=body).raise_for_status()
    for batch in (events[:25], [*retried, *events[25:40]], events[40:]):
        bulk.post("/events/batch", json=batch).raise_for_status()
    again = bulk.post("/events/batch", json=events[5:15]).json()
    assert again == {"stored": 0, "duplicates": [e["impression_id"] for e in events[5:15]]}

    assert rows(first) == rows(second) and len(rows(first)) == len(events)
    assert one.counts() == two.counts()
    assert_same_signals(one, two)  # learned in other batch shapes: float sums within 1e-9
    for user in {e["user_id"] for e in events}:
        assert single.get(f"/users/{user}").json() == bulk.get(f"/users/{user}").json()


def test_a_restart_replaying_a_bulk_loaded_log_learns_the_same(servers, rec):
    (bulk, live, folder), _ = servers
    events = replay_events(rec)
    for start in range(0, len(events), 16):
        bulk.post("/events/batch", json=events[start : start + 16]).raise_for_status()
    live.state.close()
    _, replayed = open_live(rec, folder)  # no snapshot: the log is replayed
    replayed.state.close()
    assert_same_signals(live, replayed)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ([{"impression_id": "I1", "user_id": "U1", "shown": [1]}], ["body", 0, "shown", 0]),
        ([{"impression_id": "I1", "user_id": 7, "shown": ["N1"]}], ["body", 0, "user_id"]),
        ([{"impression_id": "I1", "user_id": "U1", "shown": ["N1"], "time": 5}], None),
        ([{"impression_id": "I1", "user_id": "U1"}], ["body", 0, "shown"]),
        ([{"impression_id": "I1", "user_id": "U1", "shown": ["N1"], "more": 1}], None),
        ([{"impression_id": "I 1", "user_id": "U1", "shown": ["N1"]}], None),
        ([{"impression_id": "I1", "user_id": "U1", "shown": ["x" * 65]}], None),
        ({"impression_id": "I1"}, ["body"]),
        ("[{", None),
    ],
)
def test_a_body_msgspec_refuses_gets_the_422_pydantic_gives(servers, body, loc):
    (client, _, folder), _ = servers
    content = body if isinstance(body, str) else json.dumps(body)
    fast = client.post(
        "/events/batch", content=content, headers={"content-type": "application/json"}
    )
    plain = client.post("/events/batch", content=content, headers=PLAIN)
    assert fast.status_code == plain.status_code == 422, fast.text
    assert fast.json() == plain.json()
    if loc is not None:
        assert any(e["loc"] == loc for e in fast.json()["detail"]), fast.json()
    assert rows(folder) == []


def test_a_body_only_msgspec_refuses_is_stored_as_pydantic_accepts_it(servers, rec):
    (client, live, folder), _ = servers
    event = replay_events(rec)[0] | {"user_id": "U\x1f1"}  # a space to Python's re, not to Rust's
    assert client.post("/events/batch", json=[event]).json() == {"stored": 1, "duplicates": []}
    assert [row[2] for row in rows(folder)] == ["U\x1f1"]
    assert live.users.known("U\x1f1")


def test_other_json_content_types_are_served_too(servers, rec):
    (client, _, folder), _ = servers
    events = replay_events(rec)[:3]
    assert client.post("/events/batch", content=json.dumps(events), headers=PLAIN).json() == {
        "stored": 3, "duplicates": []
    }  # fmt: skip
    assert len(rows(folder)) == 3


NOW = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=UTC)


def test_event_times_parse_each_time_as_parse_time_does():
    values = [
        "2019-11-14T08:00:00",
        None,
        "2019-11-14T08:00:00Z",
        "2019-11-14 08:00:00",
        "2019-11-14T09:00:00+01:00",
        "2019-11-14",
        "2026-12-07T12:00:00",  # a day ahead, to the second: allowed
        "1970-01-01T00:00:00",
    ]
    seconds, faulty = event_times(values, NOW)
    clock = int(NOW.timestamp())
    assert faulty == set()
    assert seconds.tolist() == [clock if v is None else parse_time(v, NOW) for v in values]


@pytest.mark.parametrize(
    "bad",
    [
        "2019-02-30T08:00:00",  # no such day (numpy refuses the whole array)
        "2019-01-01T24:00:00",
        "2019-13-01T00:00:00",
        "0000-01-01T00:00:00",  # year 0: numpy reads it, Python does not
        "1969-12-31T23:59:59",
        "2026-12-07T12:00:01",  # over a day ahead
        "NaT",
        "yesterday",
    ],
)
def test_event_times_flag_what_parse_time_refuses(bad):
    good = "2019-11-14T08:00:00"
    seconds, faulty = event_times([good, bad, good], NOW)
    assert faulty == {1}
    assert seconds[[0, 2]].tolist() == [parse_time(good, NOW)] * 2
    with pytest.raises(ValueError, match="ISO 8601|before 1970"):
        parse_time(bad, NOW)


def test_a_batch_names_each_bad_time_as_single_events_do(servers, rec):
    (client, _, folder), _ = servers
    events = replay_events(rec)[:4]
    events[1]["time"], events[3]["time"] = "2019-02-30T08:00:00", "2999-01-01T00:00:00"
    response = client.post("/events/batch", json=events)
    assert response.status_code == 422
    expected = []
    for n in (1, 3):
        single = client.post("/events", json=events[n]).json()["detail"]
        expected += [e | {"loc": ["body", n, *e["loc"][1:]]} for e in single]
    assert response.json()["detail"] == expected
    assert rows(folder) == []


def test_bulk_lookup_finds_what_the_dict_holds_as_it_grows():
    lookup = {"": 0, "N1": 1, "N2": 2, "N10": 3}
    bulk = BulkLookup()
    ids = ["N2", "N1", "nope", "N10", "N2", "", "n1", "N1 "]
    assert bulk.index(ids, lookup).tolist() == [2, 1, -1, 3, 2, 0, -1, -1]
    lookup["nope"] = 4  # a news item added: the lookup grows in place
    assert bulk.index(ids, lookup).tolist() == [2, 1, 4, 3, 2, 0, -1, -1]
    assert bulk.index(ids * 2, lookup).tolist() == [2, 1, 4, 3, 2, 0, -1, -1] * 2  # by the cast
    other = {"N1": 7}
    assert bulk.index(["N1", "N2"], other).tolist() == [7, -1]
    assert bulk.index(["N1", "\ud800"], lookup).tolist() == [1, -1]  # not UTF-8: one by one
    assert bulk.index([], lookup).tolist() == []


def test_bulk_lookup_of_a_few_ids_makes_no_pass_over_the_served_ones(monkeypatch):
    lookup = {f"N{i}": i for i in range(1000)}

    def no_cast(*args, **kwargs):
        raise AssertionError("a cast to an Enum of every served id")

    monkeypatch.setattr(live_module.pl, "Series", no_cast)
    ids = ["N5", "N999", "gone", "N5"]  # one impression's: looked up in the dict
    assert BulkLookup().index(ids, lookup).tolist() == [5, 999, -1, 5]
