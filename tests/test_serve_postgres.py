"""The PostgreSQL state against a real server (a throwaway cluster, see postgres_cluster.py)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from mmnewsrec.serve.new_news import NewNews
from mmnewsrec.serve.state import Impression, StateError

pytest.importorskip("psycopg")

from mmnewsrec.serve.postgres import (  # noqa: E402
    SCHEMA_VERSION,
    DuplicateNews,
    Position,
    PostgresState,
    connect,
)

IDENTITY = {"store": "s1", "vectors": "v1"}


def imp(i: int, user: str = "U1", clicked: tuple[str, ...] = ("N2",)) -> Impression:
    return Impression(f"imp-{i}", user, 1_700_000_000 + i, ("N1",), ("N2", "N3"), clicked)


def test_schema_versioned_and_bound_to_its_run(postgres_url):
    PostgresState(postgres_url, IDENTITY).close()
    with connect(postgres_url) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    assert meta == {"schema_version": str(SCHEMA_VERSION), **IDENTITY}
    PostgresState(postgres_url, IDENTITY).close()  # a second start finds its own schema
    with pytest.raises(StateError, match="written for vectors 'v1', not 'v2'"):
        PostgresState(postgres_url, IDENTITY | {"vectors": "v2"})
    with connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StateError, match="schema version 99"):
        PostgresState(postgres_url, IDENTITY)


def test_unreachable_server_is_named(tmp_path):
    url = f"postgresql://nobody@/absent?host={tmp_path}&port=1"
    with pytest.raises(StateError, match="postgresql://nobody@/absent.*cannot connect"):
        PostgresState(url, IDENTITY)


def new(stored: Future[list[int]]) -> list[bool]:
    """Which impressions a write stored (a sequence number; 0: logged before)."""
    return [seq > 0 for seq in stored.result()]


def test_impressions_are_idempotent_across_replicas(postgres_url):
    a, b = PostgresState(postgres_url, IDENTITY), PostgresState(postgres_url, IDENTITY)
    try:
        assert new(a.add_impressions([imp(1), imp(2)])) == [True, True]
        assert new(b.add_impressions([imp(2), imp(3)])) == [False, True]  # a retry on B
        # Two requests in one group commit repeating an id: new in the first only.
        first, second = a.add_impressions([imp(4)]), a.add_impressions([imp(4), imp(5)])
        assert (new(first), new(second)) == ([True], [False, True])
        later = PostgresState(postgres_url, IDENTITY)
        assert later.news() == []
        assert [i.impression_id for i in later.impressions()] == [f"imp-{i}" for i in range(1, 6)]
        assert list(later.impressions())[0] == imp(1)
        assert later.counts() == {"logged_impressions": 5, "added_news": 0}
        later.close()
    finally:
        a.close()
        b.close()


def test_news_with_vectors_and_changes_in_order(postgres_url):
    a, b = PostgresState(postgres_url, IDENTITY), PostgresState(postgres_url, IDENTITY)
    try:
        assert b.news() == [] and list(b.impressions()) == []
        start = b.position
        vector = np.linspace(-1, 1, 8, dtype=np.float32)
        a.add_news(NewNews("N9", "A title", category="news"), 1_700_000_100, vector)
        a.add_impressions([imp(1, clicked=("N9",))]).result()
        with pytest.raises(DuplicateNews, match="'N9' is already served"):
            b.add_news(NewNews("N9", "Again"), 1_700_000_200, vector)
        changes = b.changes(start)
        ((news, time, stored),) = changes.news
        assert news == NewNews("N9", "A title", category="news") and time == 1_700_000_100
        np.testing.assert_array_equal(stored, vector)  # the stored vector, bit for bit
        assert changes.impressions == [imp(1, clicked=("N9",))]
        assert changes.position == a.written
        assert b.changes(changes.position).impressions == []
        assert b.changes(start, limit=0).position == Position(changes.position.news, 0)
    finally:
        a.close()
        b.close()


def test_a_follower_reading_during_concurrent_writes_misses_nothing(postgres_url):
    """Sequence order is commit order: a reader that polls `seq > last` while two replicas
    commit concurrently ends with every row, each once, in sequence order."""
    writers = [PostgresState(postgres_url, IDENTITY) for _ in range(2)]
    reader = PostgresState(postgres_url, IDENTITY)

    def write(state: PostgresState, offset: int) -> None:
        for n in range(60):  # 60 transactions each
            state.add_impressions([imp(offset + 10 * n + j) for j in range(3)]).result()

    threads = [threading.Thread(target=write, args=(w, k * 10_000)) for k, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    seen, position, finished = [], Position(), False
    try:
        while not finished:
            finished = not any(thread.is_alive() for thread in threads)
            changes = reader.changes(position)
            seen += [i.impression_id for i in changes.impressions]
            position = changes.position
        with connect(postgres_url) as db:
            logged = [
                r[0] for r in db.execute("SELECT impression_id FROM impressions ORDER BY seq")
            ]
        assert len(logged) == 2 * 60 * 3
        assert seen == logged
    finally:
        for state in (*writers, reader):
            state.close()
