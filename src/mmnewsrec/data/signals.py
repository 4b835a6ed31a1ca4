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

The batch face walks the periods in order over all logs at once: the impressions of a period
read dense per-item counts (clicks, exposures, profile holders) and a vectorised hash table of
profile pair counts, then add their own clicks, exposures and profiles. Exposures within a period
come from one sort of its candidates by (item, time); co-click pairs are looked up in chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mmnewsrec.csr import csr_offsets, segment_ids
from mmnewsrec.formats.store import DAY, NEVER, SIGNAL_NAMES, Behaviors, first_appearance

logger = logging.getLogger(__name__)

COCLICK_HISTORY = 10  # clicks of a history (and of a user profile) that co-clicks look at
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
    imps = Impressions.concat(logs, [b is train for b in logs])
    table = np.empty((len(imps.candidate_items), len(SIGNAL_NAMES)), dtype=np.float32)
    per_period_signals(imps, num_news, lag, history, table)
    first = first_appearance(logs, num_news)[imps.candidate_items]
    times = imps.times[imps.candidate_impression]
    table[:, 2] = np.log1p(np.maximum(times - first, 0) / 3600.0)
    sizes = np.diff(imps.history_offsets)
    table[:, 4] = np.log1p(sizes[imps.candidate_impression])
    bounds = csr_offsets(np.array([len(b.candidate_items) for b in logs]))
    for i, name in enumerate(splits):
        np.save(folder / f"{name}.npy", table[bounds[i] : bounds[i + 1]])
        logger.info("signals of %s: %d candidates", name, bounds[i + 1] - bounds[i])
    logger.info("signals computed in %.1f s", time.perf_counter() - started)
    return {
        "names": list(SIGNAL_NAMES),
        "train_split": train_split if train else None,
        "version": SIGNALS_VERSION,
        "lag": lag,
        "history": history,
    }


def log_share(count: np.ndarray, total: np.ndarray | int) -> np.ndarray:
    """log((count + 1) / (total + 1))."""
    return np.log1p(count) - np.log1p(total)


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


def group_by_rank(rank: np.ndarray, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions sorted by rank, stable; (ranks + 1,) bounds of each rank's positions)."""
    small = rank.astype(np.uint16) if ranks < 2**16 else rank  # radix sort
    order = np.argsort(small, kind="stable")
    return order, np.searchsorted(rank[order], np.arange(ranks + 1))


@dataclass
class Impressions:
    """The impressions of several logs as one, in log order."""

    times: np.ndarray  # (I,) int64
    users: np.ndarray  # (I,) int64
    history_offsets: np.ndarray  # (I+1,)
    history_items: np.ndarray  # (H,) int32
    candidate_offsets: np.ndarray  # (I+1,)
    candidate_items: np.ndarray  # (C,) int32
    counted: np.ndarray  # (C,) bool: a click that counts (a label 1 of the train split)

    @classmethod
    def concat(cls, logs: Sequence[Behaviors], counted: Sequence[bool]) -> Impressions:
        """`counted`: per log, whether its clicks count."""
        empty = np.zeros(0, dtype=np.int64)

        def flat(name: str, dtype: type[np.integer] = np.int64) -> np.ndarray:
            parts: list[np.ndarray] = [np.asarray(getattr(b, name), dtype=dtype) for b in logs]
            return np.concatenate([np.zeros(0, dtype=dtype), *parts])

        def offsets(kind: str) -> np.ndarray:
            sizes = [np.diff(getattr(b, f"{kind}_offsets")) for b in logs]
            return csr_offsets(np.concatenate([empty, *sizes]))

        clicks = [
            (np.asarray(b.candidate_labels) == 1) & c for b, c in zip(logs, counted, strict=True)
        ]
        return cls(
            flat("times"),
            flat("user_index"),
            offsets("history"),
            flat("history_items", np.int32),
            offsets("candidate"),
            flat("candidate_items", np.int32),
            np.concatenate([np.zeros(0, dtype=bool), *clicks]),
        )

    def take(self, rows: np.ndarray) -> Impressions:
        """The impressions of `rows`, in that order."""
        history, history_pos = last_clicks(self.history_offsets, rows, len(self.history_items))
        cand, cand_pos = last_clicks(self.candidate_offsets, rows, len(self.candidate_items))
        return Impressions(
            self.times[rows],
            self.users[rows],
            history,
            self.history_items[history_pos],
            cand,
            self.candidate_items[cand_pos],
            self.counted[cand_pos],
        )

    @cached_property
    def candidate_impression(self) -> np.ndarray:
        """(C,) the impression of each candidate."""
        return segment_ids(self.candidate_offsets)


def profile_pairs(imps: Impressions, rows: np.ndarray, width: int, history: int) -> np.ndarray:
    """Pair keys x * width + y, x <= y, of the profile (the set of the last `history` clicks)
    of each impression of `rows`, all together (x == y: the profile holds x)."""
    offsets, pos = last_clicks(imps.history_offsets, rows, history)
    return set_pairs(np.diff(offsets), imps.history_items[pos], width)


def set_pairs(sizes: np.ndarray, items: np.ndarray, width: int) -> np.ndarray:
    """Pair keys x * width + y, x <= y, of the sets of items of rows of `sizes` items each (an
    item repeated in a row counts once), all together."""
    owner = np.repeat(np.arange(len(sizes)), sizes)
    keys = np.sort(owner * width + items)
    first_of = np.ones(len(keys), dtype=bool)
    first_of[1:] = keys[1:] != keys[:-1]
    keys = keys[first_of]  # a set per row, sorted
    owner, item = np.divmod(keys, width)
    ends = csr_offsets(np.bincount(owner, minlength=len(sizes)))[owner + 1]
    # x at position i pairs with positions i .. the end of its set
    after = ends - np.arange(len(item))
    first = np.repeat(np.arange(len(item)), after)
    second = first + np.arange(len(first)) - np.repeat(csr_offsets(after)[:-1], after)
    return item[first] * width + item[second]


class PairTable:
    """Counts of int64 keys >= 0 in an open-addressing hash table (linear probing), read and
    updated a whole array of keys at a time."""

    def __init__(self, capacity: int = 0) -> None:
        self._empty(capacity)

    def _empty(self, capacity: int) -> None:
        """An empty table with room for `capacity` keys, at most a quarter full (a key absent
        from a quarter-full table is found absent after 1.4 slots on average)."""
        self.bits = max(10, (4 * capacity).bit_length())
        self.keys = np.full(1 << self.bits, -1, dtype=np.int64)
        self.counts = np.zeros(1 << self.bits, dtype=np.int64)

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        mixed = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps: Fibonacci hash
        return (mixed >> np.uint64(64 - self.bits)).astype(np.int64)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The count of each key (0 if absent)."""
        out = np.zeros(len(keys), dtype=np.int64)
        todo, slot = np.arange(len(keys)), self._slots(keys)
        mask = (1 << self.bits) - 1
        while len(todo):
            held = self.keys[slot]
            found = held == keys[todo]
            out[todo[found]] = self.counts[slot[found]]
            going = ~found & (held != -1)
            todo, slot = todo[going], (slot[going] + 1) & mask
        return out

    def add(self, keys: np.ndarray, deltas: np.ndarray) -> None:
        """counts[key] += delta (a key may come several times)."""
        held = self.keys != -1
        if 4 * (int(held.sum()) + len(keys)) > len(self.keys):  # rebuild, dropping zeros
            live = held & (self.counts != 0)
            old_keys, old_counts = self.keys[live], self.counts[live]
            self._empty(len(old_keys) + len(keys))
            self.add(old_keys, old_counts)
        todo, slot = np.arange(len(keys)), self._slots(keys)
        mask = (1 << self.bits) - 1
        while len(todo):
            empty = self.keys[slot] == -1
            self.keys[slot[empty]] = keys[todo[empty]]  # among keys after one slot, one wins
            found = self.keys[slot] == keys[todo]
            np.add.at(self.counts, slot[found], deltas[todo[found]])
            moving = ~found & ~empty  # a slot held by another key; losers look again
            slot = np.where(moving, (slot + 1) & mask, slot)[~found]
            todo = todo[~found]


def per_period_signals(
    imps: Impressions, num_news: int, lag: int, history: int, table: np.ndarray
) -> None:
    """Fill popularity, exposures and coclick of `table` (C, 5), one period at a time: what
    the impressions of a period see, then what they add."""
    width = num_news + 1
    period = imps.times // lag
    periods = np.unique(period)
    imp_order, imp_bounds = group_by_rank(np.searchsorted(periods, period), len(periods))
    times = np.unique(imps.times)
    earlier = np.searchsorted(np.sort(imps.times), imps.times)  # impressions strictly before
    clicks, shown = np.zeros(width, np.int64), np.zeros(width, np.int64)
    total_clicks = 0
    holders = np.zeros(width, np.int64)  # n(x): profiles holding x
    pairs = PairTable()  # n(x, y), x < y
    profile_of = np.full(int(imps.users.max(initial=-1)) + 1, -1)  # impression per user
    for r in range(len(periods)):
        rows = imp_order[imp_bounds[r] : imp_bounds[r + 1]]
        cand_offsets, cand = last_clicks(imps.candidate_offsets, rows, len(imps.candidate_items))
        items = imps.candidate_items[cand]
        table[cand, 0] = log_share(clicks[items], total_clicks)
        within = earlier_within(items, np.searchsorted(times, imps.times[rows]), cand_offsets)
        count = shown[items] + within
        table[cand, 1] = log_share(count, np.repeat(earlier[rows], np.diff(cand_offsets)))
        table[cand, 3] = coclick(imps, rows, cand_offsets, cand, holders, pairs, history)
        counted = imps.counted[cand]
        clicks += np.bincount(items[counted], minlength=width)
        total_clicks += int(counted.sum())
        shown += np.bincount(items, minlength=width)
        # each user's latest impression of the period (log order among equal times)
        latest = rows[np.lexsort((rows, imps.times[rows], imps.users[rows]))]
        users = imps.users[latest]
        latest = latest[np.r_[users[1:] != users[:-1], True]]
        replaced = profile_of[imps.users[latest]]
        gone = profile_pairs(imps, replaced[replaced >= 0], width, history)
        keys = np.r_[gone, profile_pairs(imps, latest, width, history)]
        signs = np.r_[np.full(len(gone), -1), np.ones(len(keys) - len(gone), np.int64)]
        x, y = np.divmod(keys, width)
        holders += np.bincount(x[x == y], signs[x == y], minlength=width).astype(np.int64)
        pairs.add(keys[x != y], signs[x != y])
        profile_of[imps.users[latest]] = latest


def earlier_within(items: np.ndarray, time_rank: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For candidates of impressions with `time_rank` (CSR `offsets`): how many candidates of
    those impressions with a strictly smaller time rank have the same item."""
    rank = np.repeat(time_rank, np.diff(offsets))
    key = items.astype(np.int64) * (int(time_rank.max(initial=0)) + 1) + rank
    order = np.argsort(key, kind="stable")
    key, item = key[order], items[order]
    position = np.arange(len(key))
    item_start = np.maximum.accumulate(np.where(np.r_[True, item[1:] != item[:-1]], position, 0))
    run_start = np.maximum.accumulate(np.where(np.r_[True, key[1:] != key[:-1]], position, 0))
    out = np.empty(len(key), np.int64)
    out[order] = run_start - item_start
    return out


def coclick(
    imps: Impressions,
    rows: np.ndarray,
    cand_offsets: np.ndarray,
    cand: np.ndarray,
    holders: np.ndarray,
    pairs: PairTable,
    history: int,
) -> np.ndarray:
    """Mean cosine of each candidate (flat positions `cand` of impressions `rows`, CSR
    `cand_offsets`) with its impression's last `history` clicks, in chunks of pairs."""
    out = np.zeros(len(cand))
    width = len(holders)
    per_row = np.diff(imps.history_offsets)[rows].clip(max=history)
    per_candidate = np.repeat(per_row, np.diff(cand_offsets))
    ends = np.cumsum(per_candidate)
    imp = np.repeat(rows, np.diff(cand_offsets))
    lo = 0
    while lo < len(cand):
        hi = int(np.searchsorted(ends, ends[lo] - per_candidate[lo] + PAIR_CHUNK, "right"))
        hi = max(hi, lo + 1)
        offsets, pos = last_clicks(imps.history_offsets, imp[lo:hi], history)
        sizes = np.diff(offsets)
        owner = np.repeat(np.arange(hi - lo), sizes)
        c = imps.candidate_items[cand[lo:hi]][owner]
        h = imps.history_items[pos]
        n_c, n_h = holders[c], holders[h]
        same = c == h  # cos(c, c) = 1 for an item in a profile
        look = np.flatnonzero((n_c > 0) & (n_h > 0) & ~same)  # else n(c, h) = 0
        low = np.minimum(c[look], h[look]).astype(np.int64)
        n_ch = pairs.get(low * width + np.maximum(c[look], h[look]))
        hit = look[n_ch > 0]
        cos = n_ch[n_ch > 0] / np.sqrt((n_c[hit] * n_h[hit]).astype(np.float64))
        total = np.bincount(owner[hit], cos, minlength=hi - lo)
        total += np.bincount(owner[same & (n_c > 0)], minlength=hi - lo)
        out[lo:hi] = total / np.maximum(sizes, 1)
        lo = hi
    return out


class SignalState:
    """Incremental face: the same definitions as build_signals, one impression at a time
    (`observe`) or a batch of them (`observe_batch`, the same state as one at a time).

    Impressions come in time order (times never decrease; equal times are fine); `signals`
    answers for a time at or after the last one observed, counting what came before it exactly
    as the batch face does: clicks of impressions before the cutoff (the start of the time's
    period of `lag` seconds), impressions shown strictly before the time. Asking at a time,
    then observing impressions of that same time, then asking again at it, gives the same
    answer. A time earlier than the latest one seen is refused (ValueError). `user` is the
    user's index; a user unseen so far is fine (the current signals do not depend on it).

    Held in memory: per news item click, exposure and first-appearance counts (numpy), the
    user profiles (the last `history` clicks of their latest history, by user index) and the
    co-occurrence counts of their items (a `PairTable`; about `history` ** 2 pairs per user),
    which change when a period starts. `to_arrays` / `from_arrays`: all of it as named arrays.
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
        self.profiles: dict[int, np.ndarray] = {}  # a set: items may repeat
        self.holders = np.zeros(1, np.int64)  # n(x): profiles holding x
        self.pairs = PairTable()  # n(x, y) of x < y as x << 32 | y, over the profiles
        self.time: int | None = None  # the latest time observed or asked for
        self._period_clicks = np.zeros(1, np.int64)  # clicks of the current period
        self._period_profiles: dict[int, np.ndarray] = {}  # latest history of each user in it
        self._now_shown: list[np.ndarray] = []  # news shown by impressions of the current time
        self._now_count = 0  # those impressions
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
        zeros = np.zeros(extra, np.int64)
        self.clicks, self.shown = np.r_[self.clicks, zeros], np.r_[self.shown, zeros]
        self.first_seen = np.r_[self.first_seen, np.full(extra, NEVER, np.int64)]
        self.holders = np.r_[self.holders, zeros]
        self._period_clicks = np.r_[self._period_clicks, zeros]
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
        self._now_count += 1
        np.add.at(self._period_clicks, np.asarray(clicked, np.int64), 1)
        self._period_profiles[int(user)] = history[-self.history :]
        for items in (shown, history):
            np.minimum.at(self.first_seen, items, time)

    def observe_batch(self, imps: Impressions) -> None:
        """Take impressions in time order, clicks where `counted`: the state `observe` reaches
        taking them one at a time."""
        times = np.asarray(imps.times, np.int64)
        if not len(times):
            return
        if np.any(np.diff(times) < 0) or (self.time is not None and times[0] < self.time):
            raise ValueError(f"times must not decrease, nor start before {self.time}")
        last = int(times[-1])
        candidate_time = times[imps.candidate_impression]
        np.minimum.at(self.first_seen, imps.candidate_items, candidate_time)
        np.minimum.at(
            self.first_seen, imps.history_items, np.repeat(times, np.diff(imps.history_offsets))
        )
        # exposures: impressions before the batch's last time count, those at it wait
        now = candidate_time == last
        if self.time is None or last > self.time:
            self._flush_shown()
            self.shown += np.bincount(imps.candidate_items[~now], minlength=len(self.shown))
            self.impressions += int((times < last).sum())
        self._now_shown.append(imps.candidate_items[now].astype(np.int64))
        self._now_count += int((times == last).sum())
        # clicks and profiles: those of periods before the last one count, its own wait
        period, current = times // self.lag, last // self.lag
        before = period < current
        clicked = imps.counted.astype(bool)
        early = clicked & before[imps.candidate_impression]
        late_clicks = np.bincount(
            imps.candidate_items[clicked & ~early], minlength=len(self.clicks)
        )
        if np.any(before) or (self.time is not None and current > self.time // self.lag):
            self._period_clicks += np.bincount(
                imps.candidate_items[early], minlength=len(self.clicks)
            )
            self._period_profiles.update(self._latest_histories(imps, np.flatnonzero(before)))
            self._flush_period()
        self._period_clicks += late_clicks
        self._period_profiles.update(self._latest_histories(imps, np.flatnonzero(~before)))
        self.time = last

    def _latest_histories(self, imps: Impressions, rows: np.ndarray) -> dict[int, np.ndarray]:
        """The last `history` clicks of each user's latest impression among `rows`."""
        users = imps.users[rows][::-1]
        _, last = np.unique(users, return_index=True)
        latest = rows[::-1][np.sort(last)][::-1]  # in row order
        offsets, pos = last_clicks(imps.history_offsets, latest, self.history)
        items = imps.history_items[pos].astype(np.int64)
        return {
            int(user): items[a:b]
            for user, a, b in zip(
                imps.users[latest].tolist(),
                offsets[:-1].tolist(),
                offsets[1:].tolist(),
                strict=True,
            )
        }

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
        c, h = np.repeat(candidates, len(history)), np.tile(history, len(candidates))
        n_c, n_h = self.holders[c], self.holders[h]
        look = np.flatnonzero((n_c > 0) & (n_h > 0) & (c != h))  # else n(c, h) = 0 or n(c)
        n_ch = np.where(c == h, n_c, 0)
        keys = np.minimum(c[look], h[look]) << 32 | np.maximum(c[look], h[look])
        n_ch[look] = self.pairs.get(keys)
        cos = np.where(n_ch > 0, n_ch / np.sqrt(np.maximum(n_c * n_h, 1).astype(np.float64)), 0)
        return cos.reshape(len(candidates), len(history)).sum(axis=1) / len(history)

    def _advance(self, time: int) -> None:
        """Move to `time`: what happened before it, and before its period, now counts."""
        if self.time is not None and time < self.time:
            raise ValueError(f"time {time} is before the latest time seen, {self.time}")
        if self.time is None or time > self.time:
            self._flush_shown()
        if self.time is None or time // self.lag > self.time // self.lag:
            self._flush_period()
        self.time = time

    def _flush_shown(self) -> None:
        """The impressions of the current time count as exposures."""
        if self._now_shown:
            self.shown += np.bincount(np.concatenate(self._now_shown), minlength=len(self.shown))
        self.impressions += self._now_count
        self._now_shown, self._now_count = [], 0

    def _flush_period(self) -> None:
        """The clicks and latest histories of the current period count."""
        self.clicks += self._period_clicks
        self.total_clicks += int(self._period_clicks.sum())
        self._period_clicks[:] = 0
        if self._period_profiles:
            self._set_profiles(self._period_profiles)
        self._period_profiles = {}

    def _set_profiles(self, new: dict[int, np.ndarray]) -> None:
        """Replace users' profiles, updating the counts of their items and pairs."""
        old = [self.profiles[user] for user in new if user in self.profiles]
        width = self.num_news + 1
        keys, signs = [], []
        for step, rows in ((-1, old), (1, list(new.values()))):
            sizes = np.array([len(row) for row in rows], np.int64)
            items = np.concatenate([np.zeros(0, np.int64), *rows])
            keys.append(set_pairs(sizes, items, width))
            signs.append(np.full(len(keys[-1]), step, np.int64))
        x, y = np.divmod(np.concatenate(keys), width)
        sign = np.concatenate(signs)
        own = x == y
        self.holders += np.bincount(x[own & (sign > 0)], minlength=width)
        self.holders -= np.bincount(x[own & (sign < 0)], minlength=width)
        self.pairs.add((x << 32 | y)[~own], sign[~own])
        self.profiles.update(new)

    # ------------------------------------------------------------------ as arrays

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything the state holds, as named arrays (`from_arrays` gives the state back):
        two states that hold the same give equal arrays."""
        keys = np.flatnonzero((self.pairs.keys != -1) & (self.pairs.counts != 0))
        order = np.argsort(self.pairs.keys[keys])
        shown = np.concatenate([np.zeros(0, np.int64), *self._now_shown])
        now_shown = np.bincount(shown, minlength=len(self.shown))  # counts: order-free, small
        scalars = [self.lag, self.history, self.num_news, -1 if self.time is None else self.time]
        scalars += [self.total_clicks, self.impressions, self._now_count]
        return {
            "scalars": np.array(scalars, np.int64),
            "clicks": self.clicks,
            "shown": self.shown,
            "first_seen": self.first_seen,
            "holders": self.holders,
            "pair_keys": self.pairs.keys[keys][order],
            "pair_counts": self.pairs.counts[keys][order],
            "period_clicks": self._period_clicks,
            "now_shown": now_shown,
            **as_rows("profile", self.profiles),
            **as_rows("period_profile", self._period_profiles),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> SignalState:
        """The state `to_arrays` gave."""
        lag, history, num_news, at, total_clicks, impressions, now_count = arrays[
            "scalars"
        ].tolist()
        state = cls(num_news, lag=lag, history=history)
        state.time = None if at < 0 else at
        state.total_clicks, state.impressions, state._now_count = (
            total_clicks,
            impressions,
            now_count,
        )
        for name in ("clicks", "shown", "first_seen", "holders"):
            setattr(state, name, np.array(arrays[name], np.int64))
        state._period_clicks = np.array(arrays["period_clicks"], np.int64)
        state.pairs = PairTable(len(arrays["pair_keys"]))
        state.pairs.add(np.asarray(arrays["pair_keys"]), np.asarray(arrays["pair_counts"]))
        counts = np.asarray(arrays["now_shown"])
        state._now_shown = [np.repeat(np.arange(len(counts)), counts)] if now_count else []
        state.profiles = from_rows("profile", arrays)
        state._period_profiles = from_rows("period_profile", arrays)
        return state


def as_rows(name: str, rows: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of int arrays by int key as three arrays, in key order: keys, CSR offsets, items."""
    keys = np.array(sorted(rows), np.int64)
    parts = [rows[key] for key in keys.tolist()]
    return {
        f"{name}_keys": keys,
        f"{name}_offsets": csr_offsets(np.array([len(p) for p in parts], np.int64)),
        f"{name}_items": np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64),
    }


def from_rows(name: str, arrays: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """The rows `as_rows` gave."""
    offsets, items = np.asarray(arrays[f"{name}_offsets"]), np.array(arrays[f"{name}_items"])
    return {
        key: items[a:b]
        for key, a, b in zip(
            arrays[f"{name}_keys"].tolist(),
            offsets[:-1].tolist(),
            offsets[1:].tolist(),
            strict=True,
        )
    }
