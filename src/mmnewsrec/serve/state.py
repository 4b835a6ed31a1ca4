"""The service's durable state: the impressions it logged and the news it added, in one
SQLite database (WAL) under a state folder.

Durability: `PRAGMA synchronous=FULL` by default. In WAL mode the log is synced to disk at
every commit, so a committed transaction survives a crash of the process and of the machine
(power loss) alike; the service answers 2xx only after the commit. "normal" syncs only at
checkpoints: a commit still survives a crash of the process (kill -9), but the last ones may
roll back on a power loss; it saves one fsync per commit.

Writes go through one writer thread that commits whatever is waiting in one transaction
(group commit): concurrent requests share an fsync instead of queueing for one each.

The storage is the few methods of `StateStore`; the schema is plain SQL, so that a backend
for several replicas (PostgreSQL) can implement the same class over the same tables.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Protocol

import numpy as np

from mmnewsrec.serve.new_news import NewNews

logger = logging.getLogger(__name__)

STATE_FILE = "state.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS impressions (
    seq INTEGER PRIMARY KEY,              -- arrival order
    impression_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    time INTEGER NOT NULL,                -- unix seconds, UTC
    history TEXT NOT NULL,                -- news ids separated by spaces, oldest first
    shown TEXT NOT NULL,
    clicked TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS news (
    seq INTEGER PRIMARY KEY,
    news_id TEXT NOT NULL UNIQUE,
    time INTEGER NOT NULL,                -- when it was added, unix seconds
    item TEXT NOT NULL,                   -- JSON of the news columns
    vector BLOB NOT NULL                  -- float32 little-endian
);
"""
SYNCHRONOUS = ("full", "normal")
CHECKED = ("store", "vectors")  # identity entries a state must match (the content hashes)
READ_CHUNK = 10_000  # rows fetched at once when replaying the log


@dataclass(frozen=True)
class Impression:
    """One logged impression, as MIND logs it (news ids; `time` in unix seconds)."""

    impression_id: str
    user_id: str
    time: int
    history: tuple[str, ...]
    shown: tuple[str, ...]
    clicked: tuple[str, ...]
    seq: int = field(default=0, compare=False)  # its place in the log (0: not logged yet)


class StateError(RuntimeError):
    """A state folder that does not belong to the served run, or cannot be opened."""


Row = tuple[str, str, int, str, str, str]  # an impression as stored (`stored_rows`)


class StateStore(Protocol):
    """What the service needs from its durable state."""

    def add_impressions(self, impressions: Sequence[Impression]) -> Future[list[int]]:
        """Store `impressions` (distinct ids) durably; the future resolves, after the commit,
        to the sequence number each new one got in the log (0: its id was logged before and it
        is not stored again)."""
        ...

    def add_rows(self, rows: Sequence[Row]) -> Future[list[int]]:
        """`add_impressions` of impressions already in their stored form."""
        ...

    def impressions(self) -> Iterator[Impression]:
        """Every logged impression in arrival order."""
        ...

    def add_news(self, news: NewNews, time: int, vector: np.ndarray) -> None:
        """Store an added news item with its vector durably."""
        ...

    def news(self) -> list[tuple[NewNews, int, np.ndarray]]:
        """The added news in order: (item, time added, vector)."""
        ...

    def counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class GroupCommit:
    """Impressions written by one writer thread, which commits whatever is waiting in one
    transaction (`_commit`, of the backend): concurrent requests share a commit."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Sequence[Row], Future] | None]
        self._queue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="state-writer", daemon=True)
        self._writer.start()

    def add_impressions(self, impressions: Sequence[Impression]) -> Future[list[int]]:
        return self.add_rows(
            stored_rows(
                [imp.impression_id for imp in impressions],
                [imp.user_id for imp in impressions],
                [imp.time for imp in impressions],
                news_lists(impressions),
            )
        )

    def add_rows(self, rows: Sequence[Row]) -> Future[list[int]]:
        future: Future[list[int]] = Future()
        self._queue.put((rows, future))
        return future

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs = [job]
            while True:  # everything already waiting goes into the same transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
            try:
                results = self._commit([batch for batch, _ in jobs])
            except Exception as err:  # noqa: BLE001 - handed to every waiting request
                logger.exception("state commit failed")
                for _, future in jobs:
                    future.set_exception(err)
                continue
            for (_, future), result in zip(jobs, results, strict=True):
                future.set_result(result)

    def _commit(self, batches: list[Sequence[Row]]) -> list[list[int]]:
        """Store several requests' impressions (rows) in one transaction; the sequence numbers
        of the new ones (0: logged before)."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish the writes already queued."""
        self._queue.put(None)
        self._writer.join()


class SQLiteState(GroupCommit):
    """`StateStore` in STATE_DIR/state.sqlite, bound to one store and one set of vectors
    (`identity`: their hashes, checked at every open, and where the store was)."""

    def __init__(
        self, folder: Path | str, identity: dict[str, str] | None, synchronous: str = "full"
    ) -> None:
        """identity: the hashes of the data served (None: open a state whatever its data,
        to read it)."""
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / STATE_FILE
        self.db = self._connect(synchronous)
        if identity is not None:
            self._check_identity(identity)
        self._lock = threading.Lock()  # the connection: writer thread and readers
        super().__init__()

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise StateError(f"{self.path}: cannot open the state database ({err})") from None
        return db

    def meta(self) -> dict[str, str]:
        """What the state records of the data it was written for."""
        with self._lock:
            return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def _check_identity(self, identity: dict[str, str]) -> None:
        """Record `identity` in a new state; refuse a state written for other data."""
        rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            self.db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(identity.items()))
            return
        for key, value in identity.items():
            if key in CHECKED and rows.get(key) != value:
                raise StateError(
                    f"{self.path} was written for {key} {rows.get(key)!r}, not {value!r}: "
                    "give the served run its own --state folder"
                )

    # ------------------------------------------------------------------ impressions

    def _commit(self, batches: list[Sequence[Row]]) -> list[list[int]]:
        """One transaction over several requests' impressions (rows); the sequence numbers of
        the new ones (0: logged before). One writer: new rows take the numbers after the last."""
        results: list[list[int]] = []
        seen: set[str] = set()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                (last,) = self.db.execute(
                    "SELECT coalesce(max(seq), 0) FROM impressions"
                ).fetchone()
                for batch in batches:
                    ids = [row[0] for row in batch]
                    logged = self._logged(ids) | seen
                    new = [i not in logged for i in ids]
                    fresh = compress(batch, new)
                    rows = [(last + n, *row) for n, row in enumerate(fresh, 1)]
                    self.db.executemany(
                        "INSERT INTO impressions (seq, impression_id, user_id, time, history,"
                        " shown, clicked) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    seqs = iter(range(last + 1, last + len(rows) + 1))
                    results.append([next(seqs) if is_new else 0 for is_new in new])
                    last += len(rows)
                    seen.update(ids)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return results

    def _logged(self, ids: list[str]) -> set[str]:
        """Which of `ids` are in the log already."""
        found: set[str] = set()
        for start in range(0, len(ids), 500):  # under SQLite's limit of bound parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT impression_id FROM impressions WHERE impression_id IN ({marks})"
            found.update(row[0] for row in self.db.execute(query, chunk))
        return found

    def impressions(self, after: int = 0) -> Iterator[Impression]:
        """Every logged impression in arrival order (after sequence number `after`)."""
        last = after
        while True:
            with self._lock:
                rows = self.db.execute(
                    "SELECT seq, impression_id, user_id, time, history, shown, clicked "
                    "FROM impressions WHERE seq > ? ORDER BY seq LIMIT ?",
                    (last, READ_CHUNK),
                ).fetchall()
            if not rows:
                return
            yield from (impression(row) for row in rows)
            last = rows[-1][0]

    def impression_id(self, seq: int) -> str | None:
        """The id of the impression logged at `seq` (None: none there)."""
        with self._lock:
            row = self.db.execute(
                "SELECT impression_id FROM impressions WHERE seq = ?", (seq,)
            ).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ news

    def add_news(self, news: NewNews, time: int, vector: np.ndarray) -> None:
        item = json.dumps({k: v for k, v in vars(news).items() if k != "news_id"})
        blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        with self._lock:
            self.db.execute(
                "INSERT INTO news (news_id, time, item, vector) VALUES (?, ?, ?, ?)",
                (news.news_id, time, item, blob),
            )

    def news(self) -> list[tuple[NewNews, int, np.ndarray]]:
        with self._lock:
            rows = self.db.execute("SELECT news_id, time, item, vector FROM news ORDER BY seq")
            return [
                (NewNews(news_id, **json.loads(item)), time, np.frombuffer(blob, dtype="<f4"))
                for news_id, time, item, blob in rows.fetchall()
            ]

    # ------------------------------------------------------------------ other

    def counts(self) -> dict[str, int]:
        with self._lock:
            (impressions,) = self.db.execute("SELECT count(*) FROM impressions").fetchone()
            (news,) = self.db.execute("SELECT count(*) FROM news").fetchone()
        return {"logged_impressions": impressions, "added_news": news}

    def close(self) -> None:
        """Finish the writes already queued, then close the database."""
        super().close()
        with self._lock:
            self.db.close()


def impression(row: tuple) -> Impression:
    """An impression from a stored row (seq, id, user, time, history, shown, clicked)."""
    seq, impression_id, user_id, time, history, shown, clicked = row
    return Impression(
        impression_id,
        user_id,
        time,
        tuple(history.split()),
        tuple(shown.split()),
        tuple(clicked.split()),
        seq,
    )


def news_lists(impressions: Sequence[Impression]) -> list[tuple[str, ...]]:
    """Each impression's history, shown and clicked news ids, in turn."""
    return [part for imp in impressions for part in (imp.history, imp.shown, imp.clicked)]


def stored_rows(
    ids: Sequence[str], users: Sequence[str], times: Sequence[int], lists: Sequence[Sequence[str]]
) -> list[Row]:
    """Impressions as stored, from their columns; `lists` holds each impression's history,
    shown and clicked news in turn, stored as ids separated by spaces."""
    joined = [" ".join(part) for part in lists]
    return list(zip(ids, users, times, joined[::3], joined[1::3], joined[2::3], strict=True))
