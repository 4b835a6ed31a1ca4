"""Where a server's state lives: a folder (SQLite, one server) or a postgresql:// URL (PostgreSQL,
shared by replicas). Opens, names and copies either."""

from __future__ import annotations

from pathlib import Path

from mmnewsrec.serve.postgres import PostgresState, redact
from mmnewsrec.serve.state import READ_CHUNK, SQLiteState


def open_state(
    location: Path | str, identity: dict[str, str] | None, synchronous: str = "full"
) -> SQLiteState | PostgresState:
    """The state in a folder (SQLite), or in the PostgreSQL database that a postgresql:// URL
    names (shared by replicas; `synchronous` is then the server's)."""
    if is_database_url(str(location)):
        return PostgresState(str(location), identity)
    return SQLiteState(location, identity, synchronous)


def is_database_url(location: str) -> bool:
    """A PostgreSQL URL (a state that replicas share) rather than a state folder."""
    return location.startswith(("postgresql://", "postgres://"))


def describe(location: Path | str) -> str:
    """A state's location as logs and manifests name it: a folder's full path, a database URL
    without its password."""
    if is_database_url(str(location)):
        return redact(str(location))
    return str(Path(location).resolve())


def copy_state(source: Path | str, target: Path | str) -> dict[str, int]:
    """Copy a state's added news (with their vectors) and logged impressions, in log order,
    into another state (a state folder into the PostgreSQL database of replicas, say), which
    then records the source's data. What the target holds already is skipped, so a copy can
    be run again. Returns the news and impressions copied."""
    origin = open_state(source, None)
    try:
        identity = {k: v for k, v in origin.meta().items() if k != "schema_version"}
        copy = open_state(target, identity)
        try:
            known = {news.news_id for news, _, _ in copy.news()}
            added = [row for row in origin.news() if row[0].news_id not in known]
            for news, time, vector in added:
                copy.add_news(news, time, vector)
            stored, batch = 0, []
            for impression in origin.impressions():
                batch.append(impression)
                if len(batch) == READ_CHUNK:
                    stored += sum(seq > 0 for seq in copy.add_impressions(batch).result())
                    batch = []
            stored += sum(seq > 0 for seq in copy.add_impressions(batch).result()) if batch else 0
        finally:
            copy.close()
    finally:
        origin.close()
    return {"news": len(added), "impressions": stored}
