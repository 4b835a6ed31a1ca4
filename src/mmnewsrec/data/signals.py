"""Behaviour signals of every (impression, candidate), computed at impression time.

One float32 row per candidate, columns `formats.store.SIGNAL_NAMES`. One definition, two faces:
`build_signals`, the vectorised pass `prepare` runs over whole logs into
STORE/signals/<split>.npy (read memory-mapped by `Store.signals`), and `SignalState`, which
takes one impression at a time and answers the same values for any candidates (the server's
face). Replaying the logs through `SignalState` in time order (train with its clicks, dev and
test without theirs) gives the batch values.

The rule: a value at an impression depends only on what happened before it. Clicks (a
candidate clicked, or an item in a history) count only from impressions before the
impression's cutoff, the start of its period of `lag` seconds (default one day: 00:00 UTC of
the impression's day), in every split alike; label-free counts (impressions shown, first
appearances) count everything strictly earlier. Labels of dev and test never count.

- popularity: log((c + 1) / (T + 1)), c = clicks on the candidate before the cutoff and T = all
  clicks before the cutoff (the batch face counts the train split's clicks).
- exposures: log((e + 1) / (E + 1)), e = earlier impressions (strictly earlier time) of all logs
  that showed the candidate, E = those earlier impressions.
- freshness: log1p(hours since the item first appeared in any log, as a candidate or a history
  click dated by its impression). The impression itself is such an appearance, so the value is
  >= 0 and later logs never change it.
- coclick: item-kNN affinity of the candidate with the history: the mean over the history's last
  `history` clicks h of cos(c, h) = n(c, h) / sqrt(n(c) n(h)), where n counts the users whose
  profile holds the items. A user's profile is the set of the last `history` clicks of the
  history of their latest impression (any log) before the cutoff. 0 for an item in no profile.
- history_len: log1p(clicks in the impression's history), the same for all its candidates.

The batch face: counts before a time by searchsorted on sorted (item, time rank) keys; the
profiles' co-occurrences as +1/-1 events per (item pair, period) (a profile enters the counts
after its period and leaves them after the period of the user's next profile), summed before
each query's period by a searchsorted on sorted (pair, period) keys, in chunks of candidates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmnewsrec.csr import csr_offsets, segment_ids
from mmnewsrec.formats.store import DAY, NEVER, SIGNAL_NAMES, Behaviors, first_appearance

logger = logging.getLogger(__name__)

COCLICK_HISTORY = 20  # clicks of a history (and of a user profile) that co-clicks look at
LAG = DAY  # seconds: clicks count from impressions before the start of the impression's period
PAIR_CHUNK = 4_000_000  # (candidate, history click) pairs looked up at once
SIGNALS_VERSION = 3  # 3: co-click profiles before the cutoff, in every log


def build_signals(
    splits: Mapping[str, Behaviors],
    num_news: int,
    folder: Path,
    train_split: str = "train",
    lag: int = LAG,
    history: int = COCLICK_HISTORY,
) -> dict[str, object]:
    """Compute every split's signals into folder/<split>.npy; returns the manifest entry."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    train = splits.get(train_split)
    train = train if train is not None and train.labelled else None
    logs = list(splits.values())
    first_seen = first_appearance(logs, num_news)
    shown = Exposures.fit(logs)
    coclick = coclick_affinities(logs, num_news, lag, history)
    for (name, behaviors), affinity in zip(splits.items(), coclick, strict=True):
        table = np.stack(
            [
                popularity(behaviors, train, lag),
                shown.share(behaviors),
                freshness(behaviors, first_seen),
                affinity,
                history_length(behaviors),
            ],
            axis=1,
        ).astype(np.float32)
        np.save(folder / f"{name}.npy", table)
        logger.info("signals of %s: %d candidates x %d", name, *table.shape)
    logger.info("signals computed in %.1f s", time.perf_counter() - started)
    return {
        "names": list(SIGNAL_NAMES),
        "train_split": train_split if train else None,
        "version": SIGNALS_VERSION,
        "lag": lag,
        "history": history,
    }


def time_ranks(times: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense rank of each time (0 = earliest) and the number of distinct times."""
    unique, rank = np.unique(np.asarray(times), return_inverse=True)
    return rank.astype(np.int64), len(unique)


def counts_before(
    event_item: np.ndarray,
    event_rank: np.ndarray,
    query_item: np.ndarray,
    query_rank: np.ndarray,
    ranks: int,
) -> np.ndarray:
    """For each query (item, time rank): events of that item with a strictly smaller rank."""
    width = ranks + 1
    keys = np.sort(event_item.astype(np.int64) * width + event_rank)
    item = query_item.astype(np.int64) * width
    return np.searchsorted(keys, item + query_rank) - np.searchsorted(keys, item)


def log_share(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """log((count + 1) / (total + 1))."""
    return np.log1p(count) - np.log1p(total)


def popularity(behaviors: Behaviors, train: Behaviors | None, lag: int = LAG) -> np.ndarray:
    """Train clicks on each candidate before the impression's cutoff, as a log share."""
    items = np.asarray(behaviors.candidate_items)
    if train is None:
        return log_share(np.zeros(len(items)), np.zeros(len(items)))
    clicked = np.asarray(train.candidate_labels) == 1
    click_time = train.item_times()[clicked]
    query_time = behaviors.item_times() // lag * lag  # the cutoff: start of the period
    rank, ranks = time_ranks(np.concatenate([click_time, query_time]))
    click_rank, query_rank = rank[: len(click_time)], rank[len(click_time) :]
    click_item = np.asarray(train.candidate_items)[clicked]
    count = counts_before(click_item, click_rank, items, query_rank, ranks)
    total = np.searchsorted(np.sort(click_rank), query_rank)
    return log_share(count, total)


@dataclass
class Exposures:
    """Impressions of all logs together, to count those before a time that showed an item."""

    times: np.ndarray  # (T,) sorted distinct impression times of all logs
    shown_keys: np.ndarray  # sorted item * (T + 1) + time rank of every candidate shown
    impression_ranks: np.ndarray  # sorted time rank of every impression

    @classmethod
    def fit(cls, logs: Sequence[Behaviors]) -> Exposures:
        """Every candidate of every log (labels are not read)."""
        parts = [b for b in logs if b.num_impressions]
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty, empty)
        times = np.unique(np.concatenate([np.asarray(b.times) for b in parts]))
        item = np.concatenate([np.asarray(b.candidate_items) for b in parts]).astype(np.int64)
        rank = np.searchsorted(times, np.concatenate([b.item_times() for b in parts]))
        impression_rank = np.searchsorted(times, np.concatenate([b.times for b in parts]))
        keys = item * (len(times) + 1) + rank
        return cls(times, np.sort(keys), np.sort(impression_rank))

    def share(self, behaviors: Behaviors) -> np.ndarray:
        """Earlier impressions of any log that showed each candidate, as a log share."""
        rank = np.searchsorted(self.times, behaviors.item_times())
        item = np.asarray(behaviors.candidate_items).astype(np.int64) * (len(self.times) + 1)
        keys = self.shown_keys
        count = np.searchsorted(keys, item + rank) - np.searchsorted(keys, item)
        total = np.searchsorted(self.impression_ranks, rank)
        return log_share(count, total)


def freshness(behaviors: Behaviors, first_seen: np.ndarray) -> np.ndarray:
    """log1p(hours from the candidate's first appearance to the impression)."""
    times = behaviors.item_times()
    first = first_seen[np.asarray(behaviors.candidate_items)]
    return np.log1p(np.maximum(times - first, 0) / 3600.0)


def history_length(behaviors: Behaviors) -> np.ndarray:
    """log1p(history length) of each candidate's impression."""
    sizes = np.diff(behaviors.history_offsets)
    return np.log1p(sizes[segment_ids(behaviors.candidate_offsets)]).astype(np.float64)


def last_clicks(
    offsets: np.ndarray, rows: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, flat positions) of the last `length` history clicks of `rows`."""
    start, end = offsets[rows], offsets[rows + 1]
    start = np.maximum(start, end - length)
    counts = end - start
    out = csr_offsets(counts)
    pos = np.arange(out[-1]) - np.repeat(out[:-1] - start, counts)
    return out, pos


@dataclass
class Impressions:
    """The impressions of several logs as one, in log order (for the co-click pass)."""

    times: np.ndarray  # (I,) int64
    users: np.ndarray  # (I,) int64
    history_offsets: np.ndarray  # (I+1,)
    history_items: np.ndarray  # (H,) int64
    candidate_offsets: np.ndarray  # (I+1,)
    candidate_items: np.ndarray  # (C,) int64

    @classmethod
    def concat(cls, logs: Sequence[Behaviors]) -> Impressions:
        def ragged(kind: str) -> tuple[np.ndarray, np.ndarray]:
            sizes = [np.diff(getattr(b, f"{kind}_offsets")) for b in logs]
            items = [np.asarray(getattr(b, f"{kind}_items")) for b in logs]
            empty = np.zeros(0, dtype=np.int64)
            return csr_offsets(np.concatenate([empty, *sizes])), np.concatenate(
                [empty, *items]
            ).astype(np.int64)

        def flat(name: str) -> np.ndarray:
            parts = [np.asarray(getattr(b, name)) for b in logs]
            return np.concatenate([np.zeros(0, dtype=np.int64), *parts]).astype(np.int64)

        return cls(flat("times"), flat("user_index"), *ragged("history"), *ragged("candidate"))


def profile_events(
    imps: Impressions, period: np.ndarray, width: int, history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pair key, period, +1/-1) of every change of the profiles' co-occurrence counts.

    A user's profile of period p is the set of the last `history` clicks of their latest
    impression in p; it counts for the periods after p, until the period of their next profile.
    Pair keys x * width + y with x <= y (x == y: the profiles holding x)."""
    n = len(imps.times)
    order = np.lexsort((np.arange(n), imps.times, imps.users))
    user, per = imps.users[order], period[order]
    is_last = np.r_[(user[1:] != user[:-1]) | (per[1:] != per[:-1]), True]
    version = order[is_last]  # per user, periods ascending
    v_user, v_period = imps.users[version], period[version]
    has_next = np.r_[v_user[1:] == v_user[:-1], False]
    v_end = np.r_[v_period[1:], 0]
    offsets, pos = last_clicks(imps.history_offsets, version, history)
    owner = np.repeat(np.arange(len(version)), np.diff(offsets))
    keys = np.unique(owner * width + imps.history_items[pos])  # a set per profile, sorted
    owner, item = np.divmod(keys, width)
    sizes = np.bincount(owner, minlength=len(version))
    starts = csr_offsets(sizes)
    # every (x, y) of one profile with x <= y: x at position i pairs with positions i..end
    after = starts[owner + 1] - np.arange(len(item))
    first = np.repeat(np.arange(len(item)), after)
    second = np.arange(len(first)) - np.repeat(
        csr_offsets(after)[:-1] - np.arange(len(item)), after
    )
    pair = item[first] * width + item[second]
    pair_owner = owner[first]
    ends = has_next[pair_owner]
    keys = np.concatenate([pair, pair[ends]])
    periods = np.concatenate([v_period[pair_owner], v_end[pair_owner][ends]])
    signs = np.concatenate([np.ones(len(pair), np.int64), -np.ones(int(ends.sum()), np.int64)])
    return keys, periods, signs


@dataclass
class PairCounts:
    """n(x, y) before a period, from the events of `profile_events`."""

    keys: np.ndarray  # sorted pair * ranks + period rank of every event
    cumulative: np.ndarray  # (E+1,) running sum of the events' signs, 0 first
    periods: np.ndarray  # sorted distinct periods of the events and queries
    width: int

    @classmethod
    def fit(
        cls,
        keys: np.ndarray,
        periods: np.ndarray,
        signs: np.ndarray,
        query_periods: np.ndarray,
        width: int,
    ) -> PairCounts:
        """Events (pair key, period, sign) and the periods that will be asked about."""
        all_periods = np.unique(np.concatenate([periods, query_periods]))
        composite = keys * (len(all_periods) + 1) + np.searchsorted(all_periods, periods)
        order = np.argsort(composite, kind="stable")
        cumulative = np.zeros(len(order) + 1, np.int64)
        np.cumsum(signs[order], out=cumulative[1:])
        return cls(composite[order], cumulative, all_periods, width)

    def before(self, x: np.ndarray, y: np.ndarray, period: np.ndarray) -> np.ndarray:
        """n(x, y) counted over the profiles of the periods before `period`."""
        lo, hi = np.minimum(x, y), np.maximum(x, y)
        base = (lo * self.width + hi) * (len(self.periods) + 1)
        rank = np.searchsorted(self.periods, period)
        return (
            self.cumulative[np.searchsorted(self.keys, base + rank)]
            - self.cumulative[np.searchsorted(self.keys, base)]
        )


def coclick_affinities(
    logs: Sequence[Behaviors], num_news: int, lag: int = LAG, history: int = COCLICK_HISTORY
) -> list[np.ndarray]:
    """The coclick signal of every candidate of each log (see the module docstring)."""
    imps = Impressions.concat(logs)
    width = num_news + 1
    period = imps.times // lag
    counts = PairCounts.fit(*profile_events(imps, period, width, history), period, width)
    out = np.zeros(len(imps.candidate_items), dtype=np.float64)
    imp_of = segment_ids(imps.candidate_offsets)
    per_candidate = np.diff(imps.history_offsets).clip(max=history)[imp_of]
    ends = np.cumsum(per_candidate)
    lo = 0
    while lo < len(out):
        hi = int(np.searchsorted(ends, ends[lo] - per_candidate[lo] + PAIR_CHUNK, "right"))
        hi = max(hi, lo + 1)
        out[lo:hi] = affinity_chunk(imps, counts, period, imp_of[lo:hi], np.arange(lo, hi), history)
        lo = hi
    bounds = csr_offsets(np.array([len(b.candidate_items) for b in logs]))
    return [out[bounds[i] : bounds[i + 1]] for i in range(len(logs))]


def affinity_chunk(
    imps: Impressions,
    counts: PairCounts,
    period: np.ndarray,
    imp: np.ndarray,
    cand: np.ndarray,
    history: int,
) -> np.ndarray:
    """Mean cosine of candidates at flat positions `cand` (impressions `imp`) with the last
    `history` clicks of their impressions."""
    offsets, pos = last_clicks(imps.history_offsets, imp, history)
    sizes = np.diff(offsets)
    owner = np.repeat(np.arange(len(cand)), sizes)
    c = imps.candidate_items[cand][owner]
    h = imps.history_items[pos]
    p = period[imp][owner]
    n_ch = counts.before(c, h, p)
    n_c, n_h = counts.before(c, c, p), counts.before(h, h, p)
    cos = np.where(n_ch > 0, n_ch / np.sqrt(np.maximum(n_c * n_h, 1).astype(np.float64)), 0.0)
    return np.bincount(owner, cos, minlength=len(cand)) / np.maximum(sizes, 1)


class SignalState:
    """Incremental face: the same definitions as build_signals, one impression at a time.

    `observe` takes impressions in time order (times never decrease; equal times are fine);
    `signals` answers for a time at or after the last one observed, counting what came before
    it exactly as the batch face does: clicks of impressions before the cutoff (the start of
    the time's period of `lag` seconds), impressions shown strictly before the time. Asking at
    a time, then observing impressions of that same time, then asking again at it, gives the
    same answer. A time earlier than the latest one seen is refused (ValueError). `user` is the
    user's index; a user unseen so far is fine (the current signals do not depend on it).

    Held in memory: per news item click, exposure and first-appearance counts (numpy), the
    user profiles and the co-occurrence counts of their items (dicts; about `history` ** 2
    pairs per user).
    """

    def __init__(self, num_news: int, lag: int = LAG, history: int = COCLICK_HISTORY) -> None:
        if lag <= 0 or history <= 0:
            raise ValueError(f"lag and history must be > 0, got {lag} and {history}")
        self.lag, self.history = lag, history
        self.num_news = 0
        self.clicks = np.zeros(1, np.int64)  # clicks before the current period
        self.total_clicks = 0
        self.shown = np.zeros(1, np.int64)  # impressions before the current time showing each
        self.impressions = 0
        self.first_seen = np.full(1, NEVER, np.int64)
        self.profiles: dict[int, frozenset[int]] = {}
        self.pairs: dict[tuple[int, int], int] = {}  # n(x, y) with x <= y, over the profiles
        self.time: int | None = None  # the latest time observed or asked for
        self._period_clicks: list[np.ndarray] = []  # clicks of the current period
        self._period_profiles: dict[int, np.ndarray] = {}  # latest history of each user in it
        self._now_shown: list[np.ndarray] = []  # impressions of the current time
        self.grow(num_news)

    @classmethod
    def empty(cls, num_news: int, **settings: int) -> SignalState:
        """A state that has seen nothing; settings: `lag` (seconds), `history` (clicks)."""
        return cls(num_news, **settings)

    def grow(self, num_news: int) -> None:
        """Make room for news indices up to `num_news` (news added at serving time)."""
        extra = num_news - self.num_news
        if extra < 0:
            raise ValueError(f"cannot shrink from {self.num_news} to {num_news} news")
        self.clicks = np.r_[self.clicks, np.zeros(extra, np.int64)]
        self.shown = np.r_[self.shown, np.zeros(extra, np.int64)]
        self.first_seen = np.r_[self.first_seen, np.full(extra, NEVER, np.int64)]
        self.num_news = num_news

    def observe(
        self,
        user: int,
        time: int,
        history: np.ndarray,
        shown: np.ndarray,
        clicked: np.ndarray,
    ) -> None:
        """Take one impression (time = seconds since epoch UTC, int news indices; clicked a
        subset of shown, may be empty)."""
        self._advance(time)
        history, shown = np.asarray(history, np.int64), np.asarray(shown, np.int64)
        self._now_shown.append(shown)
        self._period_clicks.append(np.asarray(clicked, np.int64))
        self._period_profiles[int(user)] = history[-self.history :]
        for items in (shown, history):
            np.minimum.at(self.first_seen, items, time)

    def signals(
        self, user: int, time: int, history: np.ndarray, candidates: np.ndarray
    ) -> np.ndarray:
        """float32 (len(candidates), len(SIGNAL_NAMES)) for these candidates shown to this user
        at this time."""
        self._advance(time)
        c = np.asarray(candidates, np.int64)
        history = np.asarray(history, np.int64)
        first = np.minimum(self.first_seen[c], time)
        table = np.stack(
            [
                log_share(self.clicks[c], np.full(len(c), self.total_clicks)),
                log_share(self.shown[c], np.full(len(c), self.impressions)),
                np.log1p((time - first) / 3600.0),
                self._coclick(history[-self.history :], c),
                np.full(len(c), np.log1p(len(history))),
            ],
            axis=1,
        )
        return table.astype(np.float32)

    def _coclick(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Mean cosine of each candidate with the clicks `history` over the profiles."""
        if not len(history):
            return np.zeros(len(candidates))
        pairs = self.pairs
        n_h = [pairs.get((h, h), 0) for h in history.tolist()]
        out = np.zeros(len(candidates))
        for i, c in enumerate(candidates.tolist()):
            n_c = pairs.get((c, c), 0)
            total = 0.0
            for h, n in zip(history.tolist(), n_h, strict=True):
                n_ch = pairs.get((min(c, h), max(c, h)), 0)
                if n_ch:
                    total += n_ch / np.sqrt(float(n_c * n))
            out[i] = total / len(history)
        return out

    def _advance(self, time: int) -> None:
        """Move to `time`: what happened before it, and before its period, now counts."""
        if self.time is not None and time < self.time:
            raise ValueError(f"time {time} is before the latest time seen, {self.time}")
        if self.time is None or time > self.time:
            for shown in self._now_shown:
                np.add.at(self.shown, shown, 1)
            self.impressions += len(self._now_shown)
            self._now_shown = []
        if self.time is None or time // self.lag > self.time // self.lag:
            for clicked in self._period_clicks:
                np.add.at(self.clicks, clicked, 1)
                self.total_clicks += len(clicked)
            self._period_clicks = []
            for user, history in self._period_profiles.items():
                self._set_profile(user, frozenset(history.tolist()))
            self._period_profiles = {}
        self.time = time

    def _set_profile(self, user: int, new: frozenset[int]) -> None:
        """Replace a user's profile, updating the pair counts of the items that changed."""
        old = self.profiles.get(user, frozenset())
        for gone, within, step in ((old - new, old, -1), (new - old, new, 1)):
            for x in gone:
                for y in within:
                    if y not in gone or x <= y:  # each changed pair once
                        key = (min(x, y), max(x, y))
                        count = self.pairs.get(key, 0) + step
                        if count:
                            self.pairs[key] = count
                        else:
                            del self.pairs[key]
        self.profiles[user] = new
