"""The service's durable state in PostgreSQL, shared by several replicas of one service.

The tables are those of `state.SQLiteState` (meta, impressions, news; one row per logged
impression and per added news item, each with a sequence number `seq`), created on first start
with the schema version in `meta`. Every replica writes there and follows what the others wrote
(`LogFollower`): its users, signals and news are a cache of these tables, as a single server's
are of its SQLite file.

Sequence order is commit order: a write transaction takes one advisory lock before it draws
sequence numbers and holds it until its commit is visible. A replica that has read every row up
to `seq` N then never sees a row below N appear later, so reading `seq > N` follows the log
completely, in the same order on every replica. The lock serialises the commits of all replicas
(one WAL flush each); each replica's writer thread commits everything waiting in one
transaction, so one commit carries the events of many requests. Each commit notifies the
channel LOG_CHANNEL, which wakes the followers.

Durability: PostgreSQL's `synchronous_commit` (on by default): a 2xx follows a commit that is on
the server's disk, and on its standbys' where the cluster is set up so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmnewsrec.serve.new_news import NewNews
from mmnewsrec.serve.state import (
    CHECKED,
    READ_CHUNK,
    GroupCommit,
    Impression,
    Row,
    StateError,
    impression,
)

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# The tables of state.SCHEMA in PostgreSQL's types (seq: a bigserial, vector: bytea).
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS impressions (
    seq BIGSERIAL PRIMARY KEY,
    impression_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    time BIGINT NOT NULL,
    history TEXT NOT NULL,
    shown TEXT NOT NULL,
    clicked TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS news (
    seq BIGSERIAL PRIMARY KEY,
    news_id TEXT NOT NULL UNIQUE,
    time BIGINT NOT NULL,
    item TEXT NOT NULL,
    vector BYTEA NOT NULL
);
"""
WRITE_LOCK = 0x6D6D6E72  # the advisory lock every write holds to its commit ("mmnr")
LOG_CHANNEL = "mmnewsrec_log"
INSERT_IMPRESSIONS = """
INSERT INTO impressions (impression_id, user_id, time, history, shown, clicked)
SELECT i, u, t, h, s, c
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[])
    WITH ORDINALITY AS rows (i, u, t, h, s, c, n)
ORDER BY n
ON CONFLICT (impression_id) DO NOTHING
RETURNING impression_id, seq
"""
IMPRESSION_COLUMNS = "seq, impression_id, user_id, time, history, shown, clicked"


@dataclass(frozen=True)
class Position:
    """How far a reader has read the log: the last news and impression sequence numbers."""

    news: int = 0
    impressions: int = 0


@dataclass
class Changes:
    """What was logged after a position, read in one snapshot (so that every impression's
    news are among the news read, or were read before)."""

    news: list[tuple[NewNews, int, np.ndarray]]
    impressions: list[Impression]
    position: Position


def connect(url: str, **options: Any) -> psycopg.Connection:
    """A psycopg connection to `url`, or a StateError that names it."""
    try:
        import psycopg
    except ImportError:
        raise StateError(
            "a postgresql:// state needs psycopg: pip install 'mmnewsrec[postgres]'"
        ) from None
    try:
        return psycopg.connect(url, **options)
    except psycopg.Error as err:
        raise StateError(f"{redact(url)}: cannot connect ({err})") from None


def redact(url: str) -> str:
    """`url` without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class DuplicateNews(StateError):
    """A news id that another replica added first."""


class PostgresState(GroupCommit):
    """`state.StateStore` in a PostgreSQL database, bound to one store and one set of vectors
    (`identity`, checked at every open). `news()` pins the position that `impressions()` replays
    up to, so that a replica starts from one consistent point and follows the log from there.
    A connection the server dropped is opened again at its next use (that use fails)."""

    def __init__(self, url: str, identity: dict[str, str] | None) -> None:
        """identity: the hashes of the data served (None: open a state whatever its data,
        to read it)."""
        self.url = url
        self.db = connect(url, autocommit=True)  # reads and news, under self._lock
        self._lock = threading.Lock()
        create_schema(self.db, identity, redact(url))
        self.position = Position()  # where news() and impressions() stopped reading
        self._written_news = self._written_impressions = 0  # the last rows written here
        self._replay_end: int | None = None
        self.writer_db = connect(url, autocommit=True)  # the writer thread's
        super().__init__()

    def __repr__(self) -> str:
        return f"PostgresState({redact(self.url)!r})"

    @property
    def written(self) -> Position:
        """The last news and impression this process wrote."""
        return Position(self._written_news, self._written_impressions)

    @contextmanager
    def _reader(self) -> Iterator[psycopg.Connection]:
        """The connection for reads and news, held under the lock."""
        with self._lock:
            if self.db.broken:
                self.db = connect(self.url, autocommit=True)
            yield self.db

    # ------------------------------------------------------------------ impressions

    def _commit(self, batches: list[Sequence[Row]]) -> list[list[int]]:
        """One transaction over several requests' impressions (rows); the sequence numbers of
        the new ones (0: logged before)."""
        rows = [row for batch in batches for row in batch]
        columns = [list(column) for column in zip(*rows, strict=True)]  # one array a column
        if self.writer_db.broken:
            self.writer_db = connect(self.url, autocommit=True)
        db = self.writer_db
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            inserted: dict[str, int] = dict(db.execute(INSERT_IMPRESSIONS, columns).fetchall())
            if inserted:
                db.execute("SELECT pg_notify(%s, '')", (LOG_CHANNEL,))
        if inserted:
            self._written_impressions = max(inserted.values())
        results: list[list[int]] = []
        claimed: set[str] = set()
        for batch in batches:  # an id repeated across requests is new in the first only
            ids = [row[0] for row in batch]
            results.append([0 if i in claimed else inserted.get(i, 0) for i in ids])
            claimed.update(ids)
        return results

    def impressions(self) -> Iterator[Impression]:
        """Every logged impression up to the end `news()` pinned (or up to now), in sequence
        order; `position` then stands after the last one."""
        end = self._replay_end
        if end is None:
            with self._reader() as db:
                end = value(db, "SELECT coalesce(max(seq), 0) FROM impressions")
        last, self._replay_end = 0, None
        while last < end:
            with self._reader() as db:
                rows = db.execute(
                    f"SELECT {IMPRESSION_COLUMNS} FROM impressions WHERE seq > %s AND seq <= %s"
                    " ORDER BY seq LIMIT %s",
                    (last, end, READ_CHUNK),
                ).fetchall()
            if not rows:
                break
            yield from (impression(row) for row in rows)
            last = rows[-1][0]
        self.position = Position(self.position.news, end)

    # ------------------------------------------------------------------ news

    def add_news(self, news: NewNews, time: int, vector: np.ndarray) -> None:
        """Store an added news item; `DuplicateNews` when another replica added its id."""
        import psycopg

        try:
            with self._reader() as db, db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                seq = value(
                    db,
                    "INSERT INTO news (news_id, time, item, vector) VALUES (%s, %s, %s, %s)"
                    " RETURNING seq",
                    news_row(news, time, vector),
                )
                db.execute("SELECT pg_notify(%s, '')", (LOG_CHANNEL,))
        except psycopg.errors.UniqueViolation:
            raise DuplicateNews(f"news id {news.news_id!r} is already served") from None
        self._written_news = seq  # committed

    def news(self) -> list[tuple[NewNews, int, np.ndarray]]:
        """The added news in order; pins the end of the impressions that `impressions()`
        replays next, in the same snapshot (each of their news is among these)."""
        with self._reader() as db, db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = db.execute("SELECT seq, news_id, time, item, vector FROM news ORDER BY seq")
            news = rows.fetchall()
            self._replay_end = value(db, "SELECT coalesce(max(seq), 0) FROM impressions")
        self.position = Position(news[-1][0] if news else 0, self.position.impressions)
        return [news_item(row) for row in news]

    # ------------------------------------------------------------------ following

    def changes(self, after: Position, limit: int = READ_CHUNK) -> Changes:
        """News and (at most `limit`) impressions logged after `after`, in one snapshot."""
        with self._reader() as db, db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            news = db.execute(
                "SELECT seq, news_id, time, item, vector FROM news WHERE seq > %s ORDER BY seq",
                (after.news,),
            ).fetchall()
            rows = db.execute(
                f"SELECT {IMPRESSION_COLUMNS} FROM impressions WHERE seq > %s ORDER BY seq"
                " LIMIT %s",
                (after.impressions, limit),
            ).fetchall()
        position = Position(
            news[-1][0] if news else after.news, rows[-1][0] if rows else after.impressions
        )
        return Changes([news_item(r) for r in news], [impression(r) for r in rows], position)

    # ------------------------------------------------------------------ other

    def meta(self) -> dict[str, str]:
        """What the state records of the data it was written for (and its schema version)."""
        with self._reader() as db:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())

    def counts(self) -> dict[str, int]:
        with self._reader() as db:
            impressions = value(db, "SELECT count(*) FROM impressions")
            news = value(db, "SELECT count(*) FROM news")
        return {"logged_impressions": impressions, "added_news": news}

    def close(self) -> None:
        """Finish the writes already queued, then close the connections."""
        super().close()
        self.writer_db.close()
        with self._lock:
            self.db.close()


POLL_SECONDS = 0.5  # a follower reads the log at least this often without a notification


class LogFollower:
    """Keeps one replica's cache up with the log: on every notification of a commit (and at
    least every POLL_SECONDS), reads what was logged after its position and hands it to
    `apply`, on the event loop, in sequence order. Its own writes come back the same way, so
    every replica applies the same rows in the same order."""

    def __init__(self, state: PostgresState, apply: Callable[[Changes], None]) -> None:
        self.state, self.apply = state, apply
        self.position = state.position  # what the replica's start replayed
        self._reading = asyncio.Lock()

    async def run(self) -> None:
        """Follow until cancelled; reconnects after a lost connection."""
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.state.url, autocommit=True
                ) as listener:
                    await listener.execute(f"LISTEN {LOG_CHANNEL}")
                    while True:
                        await self.catch_up()
                        async for _ in listener.notifies(timeout=POLL_SECONDS, stop_after=1):
                            pass
                        async for _ in listener.notifies(timeout=0.0):  # one read for all
                            pass
            except (psycopg.Error, OSError) as err:
                logger.warning("following %s: %s; again in 1 s", self.state, err)
                await asyncio.sleep(1.0)
            except Exception:
                logger.exception("following %s stopped", self.state)
                raise

    async def catch_up(self) -> None:
        """Apply everything logged up to now."""
        async with self._reading:
            await self._read_all()

    async def wait_for_own_writes(self) -> None:
        """Return once this replica's writes so far are applied here: it answers a write only
        when its next response reflects it."""
        written = self.state.written
        while not self._covers(written):
            async with self._reading:
                if not self._covers(written):  # another request's read may have covered it
                    await self._read_all()

    def _covers(self, written: Position) -> bool:
        return (
            self.position.news >= written.news and self.position.impressions >= written.impressions
        )

    async def _read_all(self) -> None:
        while True:
            changes = await asyncio.to_thread(self.state.changes, self.position)
            if changes.news or changes.impressions:
                self.apply(changes)
            self.position = changes.position
            if len(changes.impressions) < READ_CHUNK:
                return


def create_schema(db: psycopg.Connection, identity: dict[str, str] | None, name: str) -> None:
    """Create the tables on first start (one replica at a time) and record the schema version
    and `identity`; refuse a database of another schema version or written for other data
    (`identity` None: open it whatever its data, to read it)."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        db.execute(SCHEMA)
        rows: dict[str, str] = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not rows and identity is not None:
            new = {"schema_version": str(SCHEMA_VERSION), **identity}
            db.cursor().executemany("INSERT INTO meta VALUES (%s, %s)", sorted(new.items()))
            return
    if rows and rows.get("schema_version") != str(SCHEMA_VERSION):
        raise StateError(
            f"{name} holds state schema version {rows.get('schema_version')}, this version of "
            f"mmnewsrec reads version {SCHEMA_VERSION}"
        )
    for key, expected in (identity or {}).items():
        if key in CHECKED and rows.get(key) != expected:
            raise StateError(
                f"{name} was written for {key} {rows.get(key)!r}, not {expected!r}: give the "
                "served run its own database"
            )


def value(db: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    """The one value a query returns."""
    row = db.execute(query, params).fetchone()
    if row is None:
        raise StateError(f"no row for {query!r}")
    return row[0]


def news_row(news: NewNews, time: int, vector: np.ndarray) -> tuple[Any, ...]:
    item = json.dumps({k: v for k, v in vars(news).items() if k != "news_id"})
    return news.news_id, time, item, np.ascontiguousarray(vector, dtype="<f4").tobytes()


def news_item(row: tuple) -> tuple[NewNews, int, np.ndarray]:
    _, news_id, time, item, blob = row
    return NewNews(news_id, **json.loads(item)), time, np.frombuffer(blob, dtype="<f4")
