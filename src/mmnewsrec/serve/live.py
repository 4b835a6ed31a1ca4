"""What the service learns from its traffic: users' click histories and live popularity,
built from the store's logs at start, then from the event log, then per event.

Counters in memory are a cache of the logs: `LiveState.build` replays them at every start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmnewsrec.csr import csr_offsets, segment_ids
from mmnewsrec.data.signals import COCLICK_HISTORY, LAG, SignalState
from mmnewsrec.formats.store import DAY, NEVER, Behaviors, Store
from mmnewsrec.growing import GrowingRows, append_rows
from mmnewsrec.recall.channels import store_item_stats
from mmnewsrec.serve.backends import open_state
from mmnewsrec.serve.recommender import Recommendation, Recommender
from mmnewsrec.serve.state import READ_CHUNK, Impression, StateStore

if TYPE_CHECKING:
    from mmnewsrec.serve.new_news import NewNews
    from mmnewsrec.serve.postgres import LogFollower

logger = logging.getLogger(__name__)

COLD_START_HALF_LIFE_DAYS = 1.0  # of the cold-start list's click decay and freshness


@dataclass
class LoggedUser:
    """A user's part of the event log: the history of their latest impression that came
    with one, and their clicks as (time, news index)."""

    history_time: int = -1
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clicks: list[tuple[int, int]] = field(default_factory=list)


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
            ordered = [i for _, i in sorted(logged.clicks, key=by_time)]
            clicks.append(np.array(ordered, dtype=np.int64))
        return first_occurrences(np.concatenate([base, *clicks]).astype(np.int64, copy=False))

    def observe(self, user_id: str, time: int, history: np.ndarray, clicked: np.ndarray) -> None:
        """One logged impression of `user_id` (news indices)."""
        self.user_index(user_id)
        logged = self._logged.setdefault(user_id, LoggedUser())
        if len(history) and time >= logged.history_time:
            logged.history_time, logged.history = time, history.astype(np.int64)
        logged.clicks.extend((time, int(i)) for i in clicked)


@dataclass
class Ragged:
    """Rows of int news indices in CSR form."""

    offsets: np.ndarray
    items: np.ndarray

    def items_of(self, row: int) -> np.ndarray:
        return self.items[self.offsets[row] : self.offsets[row + 1]]


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


def index_news(lookup: dict[str, int], ids: Iterable[str]) -> np.ndarray:
    """News indices of ids known to be served."""
    return np.fromiter((lookup[i] for i in ids), dtype=np.int64)


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
        settings = store.manifest.get("signals", {})
        lag, history = settings.get("lag", LAG), settings.get("history", COCLICK_HISTORY)
        self.signals = SignalState.empty(recommender.num_news, lag=lag, history=history)
        if signals_from_store:
            replay_store(self.signals, store, split)
        recommender.signal_source = self.signal_values
        self.logged = {"logged_impressions": 0, "logged_clicks": 0}  # learned from so far

    def counts(self) -> dict[str, int]:
        """Impressions and clicks learned from the event log, and users it knows."""
        return self.logged | {"users": len(self.users)}

    def restore(self, recommender: Recommender) -> Recommender:
        """`recommender` with the added news of the state, and this state caught up with its
        logged impressions."""
        recommender = self.with_added_news(recommender, self.state.news())
        batch: list[Impression] = []
        for impression in self.state.impressions():
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
        return self.signals.signals(0, self.signals.time or 0, history, candidates)

    def news_added(self, index: int, time: int) -> None:
        """A news item added at `time`: fresh from then on."""
        self.signals.grow(max(index, self.signals.num_news))
        self.popularity.grow(index)
        self.popularity.first_seen[index] = min(self.popularity.first_seen[index], time)

    def apply(self, impressions: Sequence[Impression], lookup: dict[str, int]) -> None:
        """Learn from logged impressions (their news known to `lookup`), in order."""
        if not impressions:
            return
        # every news id of the batch looked up at once: (history, shown, clicked) per impression
        parts = [part for imp in impressions for part in (imp.history, imp.shown, imp.clicked)]
        flat = np.array([lookup[i] for part in parts for i in part], dtype=np.int64)
        bounds = np.cumsum([0, *(len(part) for part in parts)]).tolist()
        rows = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        user_index, signals = self.users.user_index, self.signals
        for n, imp in enumerate(impressions):
            history, shown, clicks = rows[3 * n : 3 * n + 3]
            self.users.observe(imp.user_id, imp.time, history, clicks)
            # an impression older than one already taken counts at that one's time
            at = max(imp.time, signals.time or 0)
            signals.observe(user_index(imp.user_id), at, history, shown, clicks)
        sizes = np.diff(bounds).reshape(-1, 3)
        is_click = np.repeat(np.tile([False, False, True], len(impressions)), sizes.ravel())
        times = np.repeat(np.array([imp.time for imp in impressions], dtype=np.int64), sizes.sum(1))
        self.popularity.observe(flat[~is_click], times[~is_click], flat[is_click], times[is_click])
        self.logged["logged_impressions"] += len(impressions)
        self.logged["logged_clicks"] += int(is_click.sum())

    def recommend(
        self, recommender: Recommender, user_id: str, k: int, exclude_history: bool
    ) -> Recommendation:
        """Top-k news for a user from their history; cold start for a user with none."""
        start = time.perf_counter()
        history = self.users.history(user_id)
        return recommender.recommend_known(
            history, k, exclude_history, start=start, cold_start=self.popularity, user=user_id
        )


def replay_store(signals: SignalState, store: Store, train_split: str) -> None:
    """Feed `signals` the store's impressions in time order: the train split with its clicks,
    the other splits without theirs, as `prepare` counts them."""
    logs = [store.behaviors(split) for split in store.splits]
    which = np.concatenate([np.full(b.num_impressions, k) for k, b in enumerate(logs)])
    row = np.concatenate([np.arange(b.num_impressions) for b in logs])
    times = np.concatenate([np.asarray(b.times) for b in logs])
    for j in np.argsort(times, kind="stable").tolist():
        b, i = logs[which[j]], int(row[j])
        items, labels = b.candidates(i)
        clicked = items[labels == 1] if b.split == train_split and b.labelled else items[:0]
        signals.observe(int(b.user_index[i]), int(b.times[i]), b.history(i), items, clicked)


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
