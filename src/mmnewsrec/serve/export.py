"""The event log back to MIND: behaviors.tsv of the logged impressions and news.tsv of the
store's news plus the added ones, so that `prepare` and `train` learn from served traffic."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mmnewsrec.data.mind import NEWS_COLUMNS, TIME_FORMAT
from mmnewsrec.files import atomic_dir, write_json
from mmnewsrec.formats.store import Store
from mmnewsrec.serve.backends import describe, open_state
from mmnewsrec.serve.new_news import NewNews
from mmnewsrec.serve.state import Impression

logger = logging.getLogger(__name__)


def export_events(state_dir: Path | str, out: Path | str, store: Path | str | None = None) -> dict:
    """Write OUT/behaviors.tsv and OUT/news.tsv (a single-split MIND folder) from a state.

    store: the store whose news the logged impressions name (default: the one the state
    records). Impression ids are the logged ones when all are integers, as MIND's are;
    otherwise their order in the log (1, 2, ...), and OUT/impression_ids.tsv maps them back."""
    state = open_state(state_dir, None)
    try:
        meta = state.meta()
        rows = [
            (imp.impression_id, imp.user_id, imp.time, " ".join(imp.history), _labels(imp))
            for imp in state.impressions()
        ]
        added = state.news()
    finally:
        state.close()
    source = Store.load(store or meta.get("store_path", ""))
    if meta.get("store") not in (None, source.content_hash):
        raise ValueError(f"{state_dir} was written for another store than {source.path}")
    behaviors = pl.DataFrame(
        rows, schema=["logged_id", "user_id", "time", "history", "impressions"], orient="row"
    )
    numeric = behaviors["logged_id"].str.contains(r"^[0-9]+$").all()
    behaviors = behaviors.with_columns(
        impression_id=pl.col("logged_id") if numeric else pl.int_range(1, len(behaviors) + 1),
        time=pl.from_epoch("time", "s").dt.strftime(TIME_FORMAT),
    )
    news = pl.concat([_store_news(source), _added_news(added)])
    counts = {"impressions": len(behaviors), "news": len(news), "added_news": len(added)}
    with atomic_dir(Path(out), "an events export") as tmp:
        _write(
            behaviors.select("impression_id", "user_id", "time", "history", "impressions"),
            tmp / "behaviors.tsv",
        )
        _write(news, tmp / "news.tsv")
        if not numeric:
            _write(behaviors.select("impression_id", "logged_id"), tmp / "impression_ids.tsv")
        write_json(tmp / "manifest.json", {"state": describe(state_dir), **counts})
    logger.info("exported %s to %s", counts, out)
    return counts


def _labels(imp: Impression) -> str:
    clicked = set(imp.clicked)
    return " ".join(f"{n}-{int(n in clicked)}" for n in imp.shown)


def _store_news(store: Store) -> pl.DataFrame:
    news = store.news
    columns = [
        pl.col(c).fill_null("") if c in news.columns else pl.lit("").alias(c) for c in NEWS_COLUMNS
    ]
    return news.select(columns).with_columns(_one_line(pl.all()))


def _added_news(added: list[tuple[NewNews, int, Any]]) -> pl.DataFrame:
    rows = [{c: getattr(news, c, "") for c in NEWS_COLUMNS} for news, _, _ in added]
    return pl.DataFrame(rows, schema=dict.fromkeys(NEWS_COLUMNS, pl.String)).with_columns(
        _one_line(pl.all())
    )


def _one_line(column: pl.Expr) -> pl.Expr:
    """Tabs and line breaks as spaces: the tsv has no quoting."""
    return column.str.replace_all(r"[\t\r\n]", " ")


def _write(frame: pl.DataFrame, path: Path) -> None:
    frame.write_csv(path, separator="\t", include_header=False, quote_style="never")


def split_events(store: Store, split: str, clicks: bool = True) -> list[dict[str, Any]]:
    """A store split's impressions as bodies of POST /events, in time order (ties in log
    order): to replay served traffic or a data set into a server. clicks: send the labels."""
    b = store.behaviors(split)
    ids, users = store.news_ids, store.user_ids
    times = np.asarray(b.times)
    stamps = np.datetime_as_string(times.astype("datetime64[s]"), unit="s")
    events = []
    for i in np.argsort(times, kind="stable").tolist():
        shown, labels = b.candidates(i)
        events.append(
            {
                "impression_id": str(b.impression_ids[i]),
                "user_id": str(users[b.user_index[i]]),
                "time": str(stamps[i]),
                "history": ids[b.history(i)].tolist(),
                "shown": ids[shown].tolist(),
                "clicked": ids[shown[labels == 1]].tolist() if clicks else [],
            }
        )
    return events
