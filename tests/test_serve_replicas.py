"""Replicas of one service over a shared PostgreSQL state (a real server, see
postgres_cluster.py): each follows the log, so what one learns the others learn, and a replica
started later replays the log to the same tables."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mmnewsrec.serve import Recommender, create_app
from mmnewsrec.serve.live import LiveState, open_live
from mmnewsrec.serve.new_news import NewNews

pytest.importorskip("psycopg")

from mmnewsrec.serve.postgres import connect  # noqa: E402


@pytest.fixture(scope="module")
def rec(tiny_run) -> Recommender:
    return Recommender.from_run(tiny_run)


@contextmanager
def replica(rec: Recommender, url: str) -> Iterator[TestClient]:
    """One replica: its own recommender, live state and follower, over the database `url`."""
    served, live = open_live(rec, url)
    try:
        with TestClient(create_app(served, live=live), raise_server_exceptions=False) as client:
            yield client
    finally:
        live.state.close()


def live_of(client: TestClient) -> LiveState:
    return client.app.state.live  # type: ignore[attr-defined]


def event(n: int, user: str, shown: list[str], clicked: list[str]) -> dict:
    return {"impression_id": f"I{n}", "user_id": user, "shown": shown, "clicked": clicked}


def seconds_until(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `check()` holds (polled every 2 ms); fails after `timeout`."""
    start = time.perf_counter()
    while not check():
        assert time.perf_counter() - start < timeout, "replicas did not converge"
        time.sleep(0.002)
    return time.perf_counter() - start


def test_an_event_posted_to_one_replica_reaches_the_other_within_a_second(rec, postgres_url):
    ids = rec.store.news["news_id"].to_list()
    with replica(rec, postgres_url) as a, replica(rec, postgres_url) as b:
        assert b.get("/users/U-x").json()["known"] is False
        a.post("/events", json=event(1, "U-x", ids[:5], [ids[3]])).raise_for_status()
        posted = time.perf_counter()
        assert a.get("/users/U-x").json()["history"] == [ids[3]]  # its own write, at once
        lag = seconds_until(lambda: b.get("/users/U-x").json()["history"] == [ids[3]])
        assert time.perf_counter() - posted < 1.0, f"B followed after {lag:.3f} s"
        # A retry on B of what A logged is no new event anywhere.
        retry = b.post("/events", json=event(1, "U-x", ids[:5], [ids[3]])).json()
        assert retry == {"impression_id": "I1", "stored": False}
        b.post("/events", json=event(2, "U-x", ids[5:9], [ids[8]])).raise_for_status()
        seconds_until(lambda: a.get("/users/U-x").json()["history"] == [ids[3], ids[8]])
        by_user = {"user_id": "U-x", "k": 5}
        assert (
            a.post("/recommend", json=by_user).json()["items"]
            == (b.post("/recommend", json=by_user).json()["items"])
        )


def test_replicas_ride_out_a_restart_of_the_database(rec, postgres_url, postgres_cluster):
    ids = rec.store.news["news_id"].to_list()
    with replica(rec, postgres_url) as a, replica(rec, postgres_url) as b:
        a.post("/events", json=event(1, "U-r", ids[:3], [ids[1]])).raise_for_status()
        seconds_until(lambda: b.get("/users/U-r").json()["history"] == [ids[1]])
        postgres_cluster.restart()  # every connection drops
        retry = event(2, "U-r", ids[3:6], [ids[4]])
        seconds_until(lambda: a.post("/events", json=retry).status_code == 200, timeout=10)
        seconds_until(lambda: b.get("/users/U-r").json()["history"] == [ids[1], ids[4]], 10)
        assert b.post("/recommend", json={"user_id": "U-r"}).status_code == 200


class StoredVector:
    """The encoder of replica A in this test: the tiny run has no text model to encode with."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector, self.calls = vector, 0

    def encode(self, news: object, has_image: bool = False) -> np.ndarray:
        self.calls += 1
        return self.vector


def test_a_news_item_added_on_one_replica_is_served_by_the_other_from_its_stored_vector(
    rec, postgres_url
):
    vector = np.linspace(-1, 1, rec.vectors.dim, dtype=np.float32)
    with replica(rec, postgres_url) as a, replica(rec, postgres_url) as b:
        a.app.state.news_encoder = encoder = StoredVector(vector)  # type: ignore[attr-defined]
        body = {"news_id": "N-new", "title": "Fresh news", "category": "news"}
        assert a.post("/news", json=body).status_code == 201
        assert a.post("/news", json=body).status_code == 409
        assert a.get("/news/N-new").status_code == 200  # served by A once answered
        seconds_until(lambda: b.get("/news/N-new").status_code == 200)
        assert b.get("/news/N-new").json()["title"] == "Fresh news"
        assert b.post("/news", json=body).status_code == 409  # added once, whichever replica
        served = b.app.state.recommender  # type: ignore[attr-defined]
        index = served.index_of("N-new")
        assert index == rec.num_news + 1
        np.testing.assert_array_equal(served.recaller.vectors_[index].numpy(), vector)
        assert b.app.state.news_encoder is None and encoder.calls == 1  # type: ignore[attr-defined]
        clicked = event(1, "U-n", ["N-new", rec.store.news_ids[1]], ["N-new"])
        assert b.post("/events", json=clicked).status_code == 200
        seconds_until(lambda: a.get("/users/U-n").json()["history"] == ["N-new"])


def tables(live: LiveState, users: list[str]) -> dict[str, np.ndarray]:
    """What a replica learned from the log: the cold-start counters, users' histories and the
    behaviour signals' counts.
    Clicks as decayed to the latest event: their stored weights are relative to a reference
    time that moves with how the log was read in batches."""
    popularity, signals = live.popularity, live.signals
    decay = 0.5 ** ((popularity.end - popularity.ref) / popularity.half_life)
    return {
        "decayed_clicks": popularity.weights * decay,
        "first_seen": popularity.first_seen,
        "latest": np.array([popularity.end]),
        **{f"history {u}": live.users.history(u) for u in users},
        "signal clicks": signals.clicks,
        "signal exposures": signals.shown,
        "signal first_seen": signals.first_seen,
        "signal totals": np.array([signals.total_clicks, signals.impressions, signals.time]),
        "signal co-clicks": signals.to_arrays()["pair_counts"],
        "signal co-click pairs": signals.to_arrays()["pair_keys"],
    }


def logged_up_to(url: str) -> int:
    with connect(url) as db:
        return db.execute("SELECT coalesce(max(seq), 0) FROM impressions").fetchone()[0]


def test_a_replica_started_later_replays_the_log_to_the_same_tables(rec, postgres_url):
    ids = rec.store.news["news_id"].to_list()
    users = [f"U{u}" for u in range(6)] + [str(rec.store.user_ids[1])]
    rng = np.random.default_rng(0)

    def load(client: TestClient, first: int) -> None:
        for n in range(first, first + 60, 2):  # two replicas take turns, concurrently
            shown = rng.choice(ids, size=5, replace=False).tolist()
            body = event(n, users[n % len(users)], shown, shown[: n % 3])
            body["time"] = f"2026-11-{1 + n // 12:02d}T{n % 24:02d}:00:00Z"  # over 5 days
            client.post("/events", json=body).raise_for_status()

    with replica(rec, postgres_url) as a, replica(rec, postgres_url) as b:
        writers = [threading.Thread(target=load, args=(c, k)) for k, c in enumerate((a, b))]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        end = logged_up_to(postgres_url)
        with replica(rec, postgres_url) as c:
            replicas = [live_of(x) for x in (a, b, c)]
            seconds_until(
                lambda: all(r.follower.position.impressions == end for r in replicas)  # type: ignore[union-attr]
            )
            expected = tables(replicas[0], users)
            assert any(len(v) for k, v in expected.items() if k.startswith("history U"))
            assert expected["signal clicks"].sum() > 0 and len(expected["signal co-clicks"])
            for other in replicas[1:]:
                got = tables(other, users)
                for name, value in expected.items():  # equal up to float rounding
                    np.testing.assert_allclose(got[name], value, rtol=1e-12, err_msg=name)


@pytest.mark.slow  # three server starts
def test_a_replica_killed_under_load_catches_up_with_the_other(tiny_run, postgres_url):
    """Two `mmnewsrec serve` processes over one database take events in turn; one is killed
    (kill -9) in the middle and restarted: both end with what every acknowledged event taught."""
    from conftest import free_port
    from test_serve_crash import start_server

    news = rec_news(tiny_run)
    ports = [free_port(), free_port()]
    servers = [start_server(tiny_run, postgres_url, port) for port in ports]  # type: ignore[arg-type]
    acked: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=5) for p in ports]
        n = 0
        while not stop.is_set():
            n += 1
            a, b = news[(5 * n + worker) % len(news)], news[(5 * n + worker + 3) % len(news)]
            body = event(n, f"K{worker}-{n % 7}", [a, b], [a]) | {"impression_id": f"{worker}-{n}"}
            try:
                response = clients[n % 2].post("/events", json=body)
            except httpx.HTTPError:
                continue  # the killed replica: its share is lost, as a client would see
            if response.status_code == 200:
                acked.append(body["impression_id"])
        for client in clients:
            client.close()

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    try:
        for worker in workers:
            worker.start()
        time.sleep(2)
        servers[1].send_signal(signal.SIGKILL)
        servers[1].wait()
        time.sleep(1)
        servers[1] = start_server(tiny_run, postgres_url, ports[1])  # type: ignore[arg-type]
        time.sleep(1)
        stop.set()
        for worker in workers:
            worker.join()
        with connect(postgres_url) as db:
            logged = [row[0] for row in db.execute("SELECT impression_id FROM impressions")]
        count = len(logged)
        assert len(acked) > 50 and set(acked) <= set(logged)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        seconds_until(
            lambda: all(
                httpx.get(f"{u}/health").json()["counts"]["logged_impressions"] == count
                for u in urls
            )
        )
        users = sorted({f"K{w}-{k}" for w in range(4) for k in range(7)})
        for user in users:
            a, b = (httpx.get(f"{u}/users/{user}").json()["history"] for u in urls)
            assert a == b and a
            by_user = {"user_id": user, "k": 5}
            a, b = (httpx.post(f"{u}/recommend", json=by_user).json()["items"] for u in urls)
            assert [i["news_id"] for i in a] == [i["news_id"] for i in b]
    finally:
        stop.set()
        for server in servers:
            server.kill()
            server.wait()


def rec_news(run) -> list[str]:
    from mmnewsrec.formats.store import Store

    return Store.load(run.parent / "store").news["news_id"].to_list()


def test_copy_state_moves_a_single_servers_state_into_the_database(rec, tmp_path, postgres_url):
    from typer.testing import CliRunner

    from mmnewsrec.cli import app

    ids = rec.store.news["news_id"].to_list()
    _, live = open_live(rec, tmp_path / "state")
    vector = np.linspace(0, 1, rec.vectors.dim, dtype=np.float32)
    live.state.add_news(NewNews("N-kept", "Kept news"), 1_700_000_000, vector)
    live.state.close()
    served, live = open_live(rec, tmp_path / "state")  # a single server, with the news added
    with TestClient(create_app(served, live=live)) as single:
        for n in range(3):
            body = event(n, f"U{n % 2}", [ids[n], "N-kept"], ["N-kept", ids[n]][: n + 1])
            single.post("/events", json=body).raise_for_status()
        histories = [single.get(f"/users/U{u}").json()["history"] for u in range(2)]
    live.state.close()
    copied = CliRunner().invoke(app, ["copy-state", str(tmp_path / "state"), postgres_url])
    assert copied.exit_code == 0, copied.output
    assert "3 impressions, 1 added news copied" in copied.output
    again = CliRunner().invoke(app, ["copy-state", str(tmp_path / "state"), postgres_url])
    assert "0 impressions, 0 added news copied" in again.output
    with replica(rec, postgres_url) as replicated:
        assert [replicated.get(f"/users/U{u}").json()["history"] for u in range(2)] == histories
        served = replicated.app.state.recommender  # type: ignore[attr-defined]
        np.testing.assert_array_equal(
            served.recaller.vectors_[served.index_of("N-kept")].numpy(), vector
        )
