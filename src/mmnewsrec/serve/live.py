"""What the service learns from its traffic: users' click histories and live popularity,
built from the store's logs at start, then from the event log, then per event.

Counters in memory are a cache of the logs: rebuilt at every start from the logs, or from a
snapshot in the state folder and the log after it (`LiveState.restore`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from mmnewsrec.csr import csr_offsets, isin_small, segment_ids
from mmnewsrec.data.signals import (
    SIGNALS_VERSION,
    Impressions,
    SignalState,
    last_clicks,
    replay_store,
)
from mmnewsrec.files import atomic_file
from mmnewsrec.formats.store import DAY, NEVER, Behaviors, Store
from mmnewsrec.growing import GrowingRows, append_rows
from mmnewsrec.recall.channels import store_item_stats
from mmnewsrec.serve.backends import open_state
from mmnewsrec.serve.recommender import Recommendation, Recommender
from mmnewsrec.serve.state import READ_CHUNK, Impression, SQLiteState, StateStore, news_lists

if TYPE_CHECKING:
    from mmnewsrec.serve.new_news import NewNews
    from mmnewsrec.serve.postgres import LogFollower

logger = logging.getLogger(__name__)

COLD_START_HALF_LIFE_DAYS = 1.0  # of the cold-start list's click decay and freshness
SNAPSHOT_FILE = "snapshot.npz"  # in a state folder: what was learned from the logs
SNAPSHOT_SECONDS = 300.0  # between snapshots of the signals while serving (and one at a stop)


@dataclass
class LoggedUser:
    """A user's part of the event log: the history of their latest impression that came
    with one, and their clicks as (time, news index) in log order, or in time order (log
    order among equal times) when `in_order`."""

    history_time: int = -1
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clicks: list[tuple[int, int]] = field(default_factory=list)
    in_order: bool = True  # else sorted at the next read, once


class Users:
    """Click histories by user id: the history of a user's latest impression (the clicks
    before the logs began, as MIND records them), then their clicks in the logs in time order,
    each news item once (at its first click). From the store's logs, then the event log."""

    def __init__(self, store: Store) -> None:
        logs = [store.behaviors(split) for split in store.splits]
        self.num_store_users = store.num_users
        self._index = {user_id: i for i, user_id in enumerate(store.user_ids.tolist())}
        self._base_row, self._base_time, self._base = latest_histories(logs, store.num_users)
        self._click_offsets, self._clicks = store_clicks(logs, store.num_users)
        self._logged: dict[str, LoggedUser] = {}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """What the event log added (its users and their clicks), as named arrays."""
        logged = list(self._logged.items())
        histories = [user.history for _, user in logged]
        clicks = [np.array(user.clicks, np.int64).reshape(-1, 2) for _, user in logged]
        return {
            "new_users": np.array(list(self._index)[self.num_store_users :], dtype=str),
            "logged_users": np.array([user_id for user_id, _ in logged], dtype=str),
            "history_times": np.array([user.history_time for _, user in logged], np.int64),
            "history_offsets": csr_offsets(np.array([len(h) for h in histories], np.int64)),
            "history_items": np.concatenate([np.zeros(0, np.int64), *histories]),
            "click_offsets": csr_offsets(np.array([len(c) for c in clicks], np.int64)),
            "clicks": np.concatenate([np.zeros((0, 2), np.int64), *clicks]),
        }

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take what the event log added from `to_arrays`'s arrays."""
        for user_id in arrays["new_users"].tolist():
            self.user_index(user_id)
        history = Ragged(arrays["history_offsets"], arrays["history_items"])
        clicks = Ragged(arrays["click_offsets"], arrays["clicks"])
        for n, (user_id, at) in enumerate(
            zip(arrays["logged_users"].tolist(), arrays["history_times"].tolist(), strict=True)
        ):
            made = sorted(((t, i) for t, i in clicks.items_of(n).tolist()), key=by_time)
            self._logged[user_id] = LoggedUser(at, history.items_of(n).copy(), made)

    def user_index(self, user_id: str) -> int:
        """The user's index (store users first, then users new to the event log in order of
        first appearance); a new index for an id never seen."""
        index = self._index.get(user_id)
        if index is None:
            index = self._index[user_id] = len(self._index)
        return index

    def __len__(self) -> int:
        return len(self._index)

    def known(self, user_id: str) -> bool:
        return user_id in self._index

    def history(self, user_id: str) -> np.ndarray:
        """(H,) int64 news indices the user clicked, oldest first, each once."""
        index = self._index.get(user_id)
        logged = self._logged.get(user_id)
        base_time, base, clicks = -1, np.zeros(0, dtype=np.int64), []
        if index is not None and index < self.num_store_users:
            row = self._base_row[index]
            if row >= 0:
                base_time, base = int(self._base_time[index]), self._base.items_of(row)
            clicks.append(self._clicks[self._click_offsets[index] : self._click_offsets[index + 1]])
        if logged is not None:
            if logged.history_time > base_time:
                base = logged.history
            if not logged.in_order:  # stable: log order among equal times
                logged.clicks.sort(key=by_time)
                logged.in_order = True
            clicks.append(np.array([i for _, i in logged.clicks], dtype=np.int64))
        return first_occurrences(np.concatenate([base, *clicks]).astype(np.int64, copy=False))

    def observe(self, user_ids: Sequence[str], times: np.ndarray, news: NewsRows) -> np.ndarray:
        """Logged impressions of `user_ids` at `times`, in order; their users' indices. Each
        user in the batch is met once: their latest impression with a history (the last of
        equal times) and their clicks in impression order."""
        index = np.fromiter(map(self.user_index, user_ids), np.int64, len(user_ids))
        history, clicked = news.part(HISTORY), news.part(CLICKED)
        users, first, inverse = np.unique(index, return_index=True, return_inverse=True)
        with_history = np.flatnonzero(np.diff(history.offsets) > 0)
        latest = np.full(len(users), -1, dtype=np.int64)  # per user: an impression, or -1
        ordered = with_history[
            np.lexsort((with_history, times[with_history], inverse[with_history]))
        ]
        last = np.r_[inverse[ordered][1:] != inverse[ordered][:-1], True][: len(ordered)]
        latest[inverse[ordered[last]]] = ordered[last]
        click_row = segment_ids(clicked.offsets)
        by_user = np.argsort(inverse[click_row], kind="stable")
        click_bounds = csr_offsets(np.bincount(inverse[click_row], minlength=len(users))).tolist()
        click_times = times[click_row[by_user]].tolist()
        click_items = clicked.items[by_user].tolist()
        latest_rows, latest_times = latest.tolist(), times[latest].tolist()
        firsts = first.tolist()
        for k in np.argsort(first).tolist():  # in order of first appearance
            user_id = user_ids[firsts[k]]
            logged = self._logged.get(user_id)
            if logged is None:
                logged = self._logged[user_id] = LoggedUser()
            row, at = latest_rows[k], latest_times[k]
            if row >= 0 and at >= logged.history_time:
                logged.history_time, logged.history = at, history.items_of(row).copy()
            start, end = click_bounds[k], click_bounds[k + 1]
            if end > start:
                made = click_times[start:end]
                if logged.in_order and (
                    (logged.clicks and made[0] < logged.clicks[-1][0])
                    or not all(map(operator.le, made[:-1], made[1:]))
                ):
                    logged.in_order = False
                logged.clicks += zip(made, click_items[start:end], strict=True)
        return index


@dataclass
class Ragged:
    """Rows of int news indices in CSR form."""

    offsets: np.ndarray
    items: np.ndarray

    def items_of(self, row: int) -> np.ndarray:
        return self.items[self.offsets[row] : self.offsets[row + 1]]

    def times(self, row_times: np.ndarray) -> np.ndarray:
        """`row_times` (one per row) repeated for each item of its row."""
        return np.repeat(row_times, np.diff(self.offsets))


def latest_histories(
    logs: Sequence[Behaviors], num_users: int
) -> tuple[np.ndarray, np.ndarray, Ragged]:
    """Per user: the row of their latest impression's history (-1: none) and its time, and
    those histories."""
    users = np.concatenate([np.asarray(b.user_index) for b in logs]).astype(np.int64)
    times = np.concatenate([np.asarray(b.times) for b in logs])
    order = np.lexsort((times, users))
    last = order[np.r_[users[order][1:] != users[order][:-1], True]] if len(order) else order
    sizes = np.concatenate([np.diff(b.history_offsets) for b in logs])
    shifts = _shifts(logs)
    starts = np.concatenate(
        [np.asarray(b.history_offsets[:-1]) + s for b, s in zip(logs, shifts, strict=True)]
    )
    items = np.concatenate([np.asarray(b.history_items) for b in logs])
    offsets = csr_offsets(sizes[last])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes[last])
    gathered = items[np.repeat(starts[last], sizes[last]) + within]
    row = np.full(num_users, -1, dtype=np.int64)
    row[users[last]] = np.arange(len(last))
    base_time = np.full(num_users, -1, dtype=np.int64)
    base_time[users[last]] = times[last]
    return row, base_time, Ragged(offsets, gathered.astype(np.int64))


def _shifts(logs: Sequence[Behaviors]) -> list[int]:
    """Where each log's history items start in their concatenation."""
    return np.concatenate([[0], np.cumsum([len(b.history_items) for b in logs])[:-1]]).tolist()


def store_clicks(logs: Sequence[Behaviors], num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Every click of the labelled logs as CSR rows by user, in time order."""
    users, times, items = [], [], []
    for b in logs:
        if not b.labelled:
            continue
        clicked = np.asarray(b.candidate_labels) == 1
        rows = segment_ids(b.candidate_offsets)[clicked]
        users.append(np.asarray(b.user_index)[rows])
        times.append(np.asarray(b.times)[rows])
        items.append(np.asarray(b.candidate_items)[clicked])
    if not users:
        return np.zeros(num_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    user, time, item = (np.concatenate(x) for x in (users, times, items))
    order = np.lexsort((time, user))  # stable: clicks of one impression keep their order
    offsets = csr_offsets(np.bincount(user, minlength=num_users))
    return offsets, item[order].astype(np.int64)


def first_occurrences(items: np.ndarray) -> np.ndarray:
    """`items` with each value kept at its first occurrence only."""
    _, first = np.unique(items, return_index=True)
    return items[np.sort(first)]


class Popularity:
    """The cold-start list: news by log(decayed clicks + 1) - log(2) * age / half life, the
    recall channel's order (`recall.channels`), from the train clicks and then the logged ones;
    a news item's age runs from its first time in the logs (or its addition).

    Clicks are kept as weights 2 ** ((t - ref) / half life) against a reference time, so that
    time moving on costs nothing per news item; the reference moves (one pass) every
    REBASE_HALF_LIVES half lives, far from float64's range."""

    REBASE_HALF_LIVES = 256

    def __init__(self, store: Store, click_split: str, half_life_days: float) -> None:
        stats = store_item_stats(store, click_split, half_life_days)
        self.weights, self.first_seen = stats.popularity.copy(), stats.first_seen.copy()
        self.ref = self.end = stats.end
        self.half_life = half_life_days * DAY
        self._grown: dict[str, GrowingRows] = {}

    def grow(self, num_news: int) -> None:
        """Room for news indices up to `num_news` (never seen, no clicks), in amortised O(1)
        per news item (`mmnewsrec.growing`)."""
        extra = num_news + 1 - len(self.weights)
        if extra > 0:
            self.weights = append_rows(self._grown, "weights", self.weights, np.zeros(extra))
            never = np.full(extra, NEVER, dtype=self.first_seen.dtype)
            self.first_seen = append_rows(self._grown, "first_seen", self.first_seen, never)

    def observe(
        self, seen: np.ndarray, seen_times: np.ndarray, clicked: np.ndarray, click_times: np.ndarray
    ) -> None:
        """News shown or in a history (`seen`) and news clicked, at their impressions' times."""
        if len(seen_times):
            self.end = max(self.end, int(seen_times.max()))
        if (self.end - self.ref) / self.half_life > self.REBASE_HALF_LIVES:
            self.weights *= 0.5 ** ((self.end - self.ref) / self.half_life)
            self.ref = self.end
        np.minimum.at(self.first_seen, seen, seen_times)
        np.add.at(self.weights, clicked, 2.0 ** ((click_times - self.ref) / self.half_life))

    def top(self, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the best k news not in `exclude`, among the news seen."""
        seen = self.first_seen != NEVER
        clicks = self.weights * 0.5 ** ((self.end - self.ref) / self.half_life)
        age = (self.end - np.where(seen, self.first_seen, self.end)) / self.half_life
        scores = np.where(seen, np.log(clicks + 1.0) - np.log(2.0) * age, -np.inf)
        scores[0] = -np.inf
        scores[exclude] = -np.inf
        count = min(k, int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, count - 1)[:count] if count else np.zeros(0, np.int64)
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]


class BulkLookup:
    """News indices of many ids at once (-1: not served), by a cast to a polars Enum of the
    served ids: a hash join in Rust, about half the CPU of a dict lookup per id at a
    bulk load's 300,000 ids. The Enum is made again when the ids served change (news are only
    ever added to a lookup). A cast costs a pass over the served ids (about 18 ms at 100k
    news), so fewer ids than twice those served (one impression's, a small batch's) are looked
    up in the dict, which costs about 0.16 us an id."""

    def __init__(self) -> None:
        self._enum: tuple[dict[str, int], int, pl.Enum, np.ndarray] | None = None

    def index(self, ids: list[str], lookup: dict[str, int]) -> np.ndarray:
        if len(ids) < 2 * len(lookup):
            return np.fromiter(map(lookup.get, ids, repeat(-1)), np.int64, len(ids))
        made = self._enum  # read once: another thread may make the next one
        if made is None or made[0] is not lookup or made[1] != len(lookup):
            items = list(lookup.items())  # at once: news may be added meanwhile
            codes = np.array([index for _, index in items], dtype=np.int64)
            made = self._enum = (lookup, len(items), pl.Enum([i for i, _ in items]), codes)
        _, _, enum, codes = made
        try:
            series = pl.Series(ids, dtype=pl.String)
        except UnicodeEncodeError:  # a lone surrogate (json.loads makes them): one at a time
            return np.fromiter(map(lookup.get, ids, repeat(-1)), np.int64, len(ids))
        position = series.cast(enum, strict=False).to_physical().fill_null(len(codes))
        return np.r_[codes, -1][position.to_numpy()]


BULK_LOOKUP = BulkLookup()  # of the lookup served last


def index_news(lookup: dict[str, int], ids: Iterable[str]) -> np.ndarray:
    """News indices of ids known to be served."""
    return np.fromiter((lookup[i] for i in ids), dtype=np.int64)


HISTORY, SHOWN, CLICKED = range(3)  # the news lists of an impression, in `NewsRows` order


@dataclass
class NewsRows:
    """The news lists of impressions as indices: impression n's history, shown and clicked
    are rows 3n, 3n + 1 and 3n + 2 (CSR; -1 for an id not served)."""

    offsets: np.ndarray
    items: np.ndarray
    _parts: dict[int, Ragged] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, impressions: Sequence[Impression], lookup: dict[str, int]) -> NewsRows:
        """Every news id of `impressions` looked up at once."""
        return cls.of_lists(news_lists(impressions), lookup)

    @classmethod
    def of_lists(cls, lists: Sequence[Sequence[str]], lookup: dict[str, int]) -> NewsRows:
        """Lists of news ids (history, shown, clicked of each impression in turn) looked up."""
        items = BULK_LOOKUP.index(list(chain.from_iterable(lists)), lookup)
        return cls(csr_offsets(np.fromiter(map(len, lists), np.int64, len(lists))), items)

    def take(self, impressions: np.ndarray) -> NewsRows:
        """The rows of these impressions, in that order."""
        rows = (3 * np.asarray(impressions)[:, None] + np.arange(3)).ravel()
        offsets, pos = last_clicks(self.offsets, rows, len(self.items))
        return NewsRows(offsets, self.items[pos])

    def part(self, which: int) -> Ragged:
        """One list (HISTORY, SHOWN or CLICKED) of every impression (made once)."""
        if which not in self._parts:
            rows = np.arange(which, len(self.offsets) - 1, 3)
            offsets, pos = last_clicks(self.offsets, rows, len(self.items))
            self._parts[which] = Ragged(offsets, self.items[pos])
        return self._parts[which]

    def clicked(self) -> np.ndarray:
        """(shown items,) bool: the shown item was clicked in its impression."""
        shown, clicked = self.part(SHOWN), self.part(CLICKED)
        width = int(self.items.max(initial=0)) + 1
        keys = segment_ids(shown.offsets).astype(np.int64) * width + shown.items
        clicks = segment_ids(clicked.offsets).astype(np.int64) * width + clicked.items
        return isin_small(keys, clicks)


class LiveState:
    """The durable state of a service and what it learned from it: users' histories and the
    cold-start list, updated per logged impression."""

    def __init__(
        self, recommender: Recommender, state: StateStore, signals_from_store: bool = True
    ) -> None:
        """signals_from_store: the behaviour signals start from the store's logs (False: from
        nothing, as for a replay of those logs through the server)."""
        store = recommender.store
        self.state = state
        self.users = Users(store)
        split = recommender.ranker.config.data.train_split
        self.popularity = Popularity(store, split, COLD_START_HALF_LIFE_DAYS)
        self.popularity.grow(recommender.num_news)
        self.follower: LogFollower | None = None  # set where replicas share the log
        self.signals = SignalState.for_store(store, recommender.num_news)
        self.stamp = {  # what a snapshot of the signals must have been taken of
            "store": store.content_hash,
            "vectors": recommender.vectors.hash,
            "signals_from_store": signals_from_store,
            "signals_version": SIGNALS_VERSION,
            "lag": self.signals.lag,
            "history": self.signals.history,
            "profile": self.signals.profile,
        }
        self.seq, self.last_id = 0, ""  # the latest logged impression learned from
        self.snapshot_seq = 0  # the snapshot read at start holds the log up to here
        self.signals_from_store = signals_from_store
        recommender.signal_source = self.signal_values
        # learning (on the event loop) against recommendations computed in worker threads
        # (`serve --parallel`), which read the users' histories and the signals
        self.lock = threading.Lock()
        self.logged = {"logged_impressions": 0, "logged_clicks": 0}  # learned from so far

    def counts(self) -> dict[str, int]:
        """Impressions and clicks learned from the event log, and users it knows."""
        return self.logged | {"users": len(self.users)}

    def restore(self, recommender: Recommender) -> Recommender:
        """`recommender` with the added news of the state, and this state caught up with its
        logged impressions."""
        recommender = self.with_added_news(recommender, self.state.news())
        after = self.load_snapshot(self.folder) if self.folder else 0
        if not after and self.signals_from_store:
            split = recommender.ranker.config.data.train_split
            replay_store(self.signals, recommender.store, split)
        if isinstance(self.state, SQLiteState):
            logged = self.state.impressions(after)
        else:
            logged = self.state.impressions()
        batch: list[Impression] = []
        for impression in logged:
            batch.append(impression)
            if len(batch) == READ_CHUNK:
                self.apply(batch, recommender.news_lookup)
                batch = []
        self.apply(batch, recommender.news_lookup)
        logger.info("state %s: %s", self.state, self.state.counts())
        recommender.recommend([recommender.news_ids_of([1])[0]], k=1)  # warm-up
        return recommender

    def with_added_news(
        self, recommender: Recommender, added: Sequence[tuple[NewNews, int, np.ndarray]]
    ) -> Recommender:
        """`recommender` with logged news (item, time added, vector), fresh from their time.
        The counters take them first: the recommender's lookups, which it shares with the one
        it came from, then find them."""
        if added:
            for j, (_, time, _) in enumerate(added):
                self.news_added(recommender.num_news + 1 + j, time)
            recommender = recommender.with_news_batch([(n, v) for n, _, v in added])
        return recommender

    def signal_values(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """The candidates' behaviour signals (C, len(SIGNAL_NAMES)) for a click history, at the
        time of the latest logged impression: the log's clock, which a replay of old logs
        moves as it goes. (The signals do not depend on the user's index.)"""
        with self.lock:
            return self.signals.signals(0, self.signals.time or 0, history, candidates)

    def news_added(self, index: int, time: int) -> None:
        """A news item added at `time`: fresh from then on."""
        self.signals.grow(max(index, self.signals.num_news))
        self.popularity.grow(index)
        self.popularity.first_seen[index] = min(self.popularity.first_seen[index], time)

    def apply(self, impressions: Sequence[Impression], lookup: dict[str, int]) -> None:
        """Learn from logged impressions (their news known to `lookup`), in log order."""
        if not impressions:
            return
        n = len(impressions)
        self.learn(
            [imp.impression_id for imp in impressions],
            [imp.user_id for imp in impressions],
            np.fromiter((imp.time for imp in impressions), np.int64, n),
            NewsRows.of(impressions, lookup),
            np.fromiter((imp.seq for imp in impressions), np.int64, n),
        )

    def learn(
        self,
        impression_ids: Sequence[str],
        user_ids: Sequence[str],
        times: np.ndarray,
        news: NewsRows,
        seqs: np.ndarray,
    ) -> None:
        """Learn from logged impressions given as columns, in log order: their users, times,
        news (every id served) and places in the log."""
        if not len(times):
            return
        if np.any(news.items < 0):
            raise KeyError(f"news ids not served: {np.flatnonzero(news.items < 0)[:5]}")
        with self.lock:
            users = self.users.observe(user_ids, times, news)
            self.learn_signals(users, times, news)
            history, shown, clicked = (news.part(k) for k in (HISTORY, SHOWN, CLICKED))
            seen = np.concatenate((history.items, shown.items))
            seen_times = np.concatenate((history.times(times), shown.times(times)))
            self.popularity.observe(seen, seen_times, clicked.items, clicked.times(times))
            self.logged["logged_impressions"] += len(times)
            self.logged["logged_clicks"] += len(clicked.items)
            latest = int(seqs.argmax())
            if seqs[latest] > self.seq:
                self.seq, self.last_id = int(seqs[latest]), impression_ids[latest]

    def learn_signals(self, users: np.ndarray, times: np.ndarray, news: NewsRows) -> None:
        """The signals learn from impressions of these users (indices) at these times: an
        impression older than one already taken counts at that one's time."""
        at = np.maximum.accumulate(np.maximum(times, self.signals.time or 0))
        history, shown = news.part(HISTORY), news.part(SHOWN)
        imps = Impressions(
            at, users, history.offsets, history.items, shown.offsets, shown.items, news.clicked()
        )
        self.signals.observe_batch(imps)

    # ------------------------------------------------------------------ snapshots

    @property
    def folder(self) -> Path | None:
        """The state folder (None: a database) where snapshots of the signals are kept."""
        return self.state.folder if isinstance(self.state, SQLiteState) else None

    def snapshot(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(stamp, arrays) of what was learned from the logs: the signals, the users, the
        cold-start counts; a copy, to write while the state moves on."""
        stamp = self.stamp | {"seq": self.seq, "impression_id": self.last_id}
        stamp |= {
            "logged": dict(self.logged),
            "popularity": [self.popularity.ref, self.popularity.end],
        }
        arrays = {f"signals.{k}": v for k, v in self.signals.to_arrays().items()}
        arrays |= {f"users.{k}": v for k, v in self.users.to_arrays().items()}
        arrays |= {"popularity.weights": self.popularity.weights}
        arrays |= {"popularity.first_seen": self.popularity.first_seen}
        return stamp, {name: a.copy() for name, a in arrays.items()}

    def save_snapshot(self) -> Path | None:
        """Write the snapshot to the state folder (see `write_snapshot`); None: no folder, or
        nothing logged yet."""
        if self.folder is None or not self.seq:
            return None
        stamp, arrays = self.snapshot()
        return write_snapshot(self.folder, stamp, arrays)

    async def keep_snapshots(self, seconds: float = SNAPSHOT_SECONDS) -> None:
        """Every `seconds` (until cancelled), a snapshot if the state learned since the last
        one; written in a thread."""
        saved = self.snapshot_seq
        while self.folder is not None:
            await asyncio.sleep(seconds)
            if self.seq != saved:
                stamp, arrays = self.snapshot()
                await asyncio.to_thread(write_snapshot, self.folder, stamp, arrays)
                saved = stamp["seq"]

    def load_snapshot(self, folder: Path) -> int:
        """Take what was learned from the logs from folder/SNAPSHOT_FILE if it was written for
        this data and the log still holds the impression it stopped at: the sequence number
        of that impression (the log is to be replayed after it). Else log why not, and 0."""
        path = folder / SNAPSHOT_FILE
        if not path.is_file() or not isinstance(self.state, SQLiteState):
            return 0
        part: dict[str, dict[str, np.ndarray]] = {}
        try:
            with np.load(path) as saved:
                stamp = json.loads(str(saved["stamp"]))
                for name in saved.files:
                    owner, _, key = name.partition(".")
                    part.setdefault(owner, {})[key] = saved[name]
            signals = SignalState.from_arrays(part["signals"])
        except (OSError, ValueError, KeyError) as err:
            logger.warning("%s: not read (%s); replaying the logs", path, err)
            return 0
        differs = [key for key, value in self.stamp.items() if stamp.get(key) != value]
        seq = int(stamp.get("seq", 0))
        if differs:
            reason = f"written for other {', '.join(differs)}"
        elif seq < 1 or self.state.impression_id(seq) != stamp.get("impression_id"):
            reason = f"the log holds no impression {stamp.get('impression_id')!r} at {seq}"
        elif signals.num_news > self.signals.num_news:
            reason = f"{signals.num_news} news, more than the {self.signals.num_news} served"
        else:
            signals.grow(self.signals.num_news)
            self.signals, self.snapshot_seq = signals, seq
            self.seq, self.last_id = seq, stamp["impression_id"]
            self.users.load_arrays(part["users"])
            self.popularity.grow(self.signals.num_news)
            size = len(part["popularity"]["weights"])
            self.popularity.weights[:size] = part["popularity"]["weights"]
            self.popularity.first_seen[:size] = part["popularity"]["first_seen"]
            self.popularity.ref, self.popularity.end = stamp["popularity"]
            self.logged = stamp["logged"]
            logger.info("state learned up to impression %d read from %s", seq, path)
            return seq
        logger.warning("%s ignored: %s; replaying the logs", path, reason)
        return 0

    def history(self, user_id: str) -> np.ndarray:
        """`Users.history`, read while no event is being learned (it may sort the user's
        clicks)."""
        with self.lock:
            return self.users.history(user_id)

    def recommend(
        self, recommender: Recommender, user_id: str, k: int, exclude_history: bool
    ) -> Recommendation:
        """Top-k news for a user from their history; cold start for a user with none."""
        start = time.perf_counter()
        history = self.history(user_id)
        return recommender.recommend_known(
            history, k, exclude_history, start=start, cold_start=self.popularity, user=user_id
        )


def write_snapshot(folder: Path, stamp: dict[str, Any], arrays: dict[str, Any]) -> Path:
    """Write a snapshot (`LiveState.snapshot`) to folder/SNAPSHOT_FILE, atomically (under a
    temporary name, then renamed), `stamp` beside the arrays."""
    path = folder / SNAPSHOT_FILE
    started = time.perf_counter()
    with atomic_file(path) as tmp, tmp.open("wb") as out:
        np.savez(out, stamp=np.array(json.dumps(stamp)), **arrays)
    seconds = time.perf_counter() - started
    logger.info("snapshot at impression %d in %.2f s: %s", stamp["seq"], seconds, path)
    return path


def open_live(
    recommender: Recommender,
    folder: Path | str,
    synchronous: str = "full",
    signals_from_store: bool = True,
) -> tuple[Recommender, LiveState]:
    """The state kept in `folder` (created if new), or in the PostgreSQL database a
    postgresql:// URL names, for `recommender`'s store and vectors, and the recommender with
    its added news."""
    identity = {"store": recommender.store.content_hash, "vectors": recommender.vectors.hash}
    where = {"store_path": str(recommender.store.path.resolve())}  # for export-events
    state = open_state(folder, identity | where, synchronous)
    live = LiveState(recommender, state, signals_from_store)
    return live.restore(recommender), live


def by_time(click: tuple[int, int]) -> int:
    return click[0]
