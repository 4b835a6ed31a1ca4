"""Behaviour signals of every (impression, candidate), computed at impression time.

One float32 row per candidate, columns `formats.store.SIGNAL_NAMES`, written by `prepare` to
STORE/signals/<split>.npy (read memory-mapped by `Store.signals`). Each value uses only what was
known when the impression was shown, and never a label of the split it describes:

- popularity: log((c + 1) / (T + 1)), c = clicks on the candidate in the train split and T = all
  train clicks, both counting only clicks strictly before the start (00:00 UTC) of the
  impression's day, in every split alike. A dev or test impression of a later day so sees every
  train click, and a train impression sees what dev sees: a lag to the day before, never its own
  click nor another click of the same day.
- exposures: log((e + 1) / (E + 1)), e = earlier impressions (strictly earlier time) of all logs
  together (train, dev, test in time order) that showed the candidate, E = those earlier
  impressions. No labels needed, so dev continues the count where train ends instead of
  starting from zero.
- freshness: log1p(hours since the item first appeared in any log of any split), as a candidate
  or a history click (dated by its impression). The impression itself is such an appearance, so
  the value is >= 0 and later logs never change it.
- coclick: item-kNN affinity of the candidate with the history: the mean over the history's last
  `COCLICK_HISTORY` clicks h of cos(c, h) = n(c, h) / sqrt(n(c) n(h)), where n counts train users
  whose profile (the history of their latest train impression, last `COCLICK_HISTORY` clicks)
  holds the items. The user of the impression is left out of every count (their own profile may
  hold this impression's clicks), in every split alike. 0 for an item no other user clicked.
- history_len: log1p(clicks in the impression's history), the same for all its candidates.

Everything is vectorised: counts before a time by searchsorted on sorted (item, time rank) keys,
co-occurrence as a sparse item x item matrix looked up by sorted keys, in chunks of candidates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from mmnewsrec.csr import csr_offsets, segment_ids
from mmnewsrec.formats.store import DAY, SIGNAL_NAMES, Behaviors, first_appearance

logger = logging.getLogger(__name__)

COCLICK_HISTORY = 50  # clicks of a history (and of a user profile) that co-clicks look at
PAIR_CHUNK = 4_000_000  # (candidate, history click) pairs looked up at once
SIGNALS_VERSION = 2  # 2: exposures over all logs, popularity up to the impression's day


def build_signals(
    splits: Mapping[str, Behaviors], num_news: int, folder: Path, train_split: str = "train"
) -> dict[str, object]:
    """Compute every split's signals into folder/<split>.npy; returns the manifest entry."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    train = splits.get(train_split)
    train = train if train is not None and train.labelled else None
    first_seen = first_appearance(splits.values(), num_news)
    shown = Exposures.fit(splits.values())
    coclick = CoClicks.fit(train, num_news)
    for name, behaviors in splits.items():
        table = np.stack(
            [
                popularity(behaviors, train),
                shown.share(behaviors),
                freshness(behaviors, first_seen),
                coclick.affinity(behaviors),
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


def popularity(behaviors: Behaviors, train: Behaviors | None) -> np.ndarray:
    """Train clicks on each candidate before the impression's day began, as a log share."""
    items = np.asarray(behaviors.candidate_items)
    if train is None:
        return log_share(np.zeros(len(items)), np.zeros(len(items)))
    clicked = np.asarray(train.candidate_labels) == 1
    click_time = train.item_times()[clicked]
    query_time = behaviors.item_times() // DAY * DAY  # 00:00 UTC of the impression's day
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
    def fit(cls, logs: Iterable[Behaviors]) -> Exposures:
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


def find_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each key is in `sorted_keys`, its position there; clipped where it is not)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool), np.zeros(0, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys, at


@dataclass
class CoClicks:
    """Item co-occurrence over train user profiles, with lookups that leave a user out."""

    profile_keys: np.ndarray  # sorted user * width + item of every profile click
    pair_keys: np.ndarray  # sorted c * width + h with n(c, h) > 0
    pair_counts: np.ndarray  # n(c, h)
    item_counts: np.ndarray  # (width,) n(c): profiles holding c
    width: int  # N + 1

    @classmethod
    def fit(cls, train: Behaviors | None, num_news: int) -> CoClicks:
        """Profiles: each train user's latest history (last COCLICK_HISTORY clicks)."""
        width = num_news + 1
        empty = np.zeros(0, dtype=np.int64)
        if train is None or train.num_impressions == 0:
            return cls(empty, empty, empty, np.zeros(width, dtype=np.int64), width)
        users = np.asarray(train.user_index).astype(np.int64)
        order = np.lexsort((np.asarray(train.times), users))
        is_last = np.r_[users[order][1:] != users[order][:-1], True]
        latest = order[is_last]  # (U',) each user's latest impression
        offsets, pos = last_clicks(np.asarray(train.history_offsets), latest, COCLICK_HISTORY)
        user = np.repeat(users[latest], np.diff(offsets))
        item = np.asarray(train.history_items)[pos].astype(np.int64)
        profile_keys = np.unique(user * width + item)
        if not len(profile_keys):
            return cls(empty, empty, empty, np.zeros(width, dtype=np.int64), width)
        user, item = np.divmod(profile_keys, width)
        rows = np.searchsorted(np.unique(user), user)
        x = sp.csr_matrix(
            (np.ones(len(item), np.int64), (rows, item)), shape=(rows.max() + 1, width)
        )
        co = (x.T @ x).tocoo()
        keys = co.row.astype(np.int64) * width + co.col
        order = np.argsort(keys)
        item_counts = np.bincount(item, minlength=width)
        return cls(profile_keys, keys[order], co.data[order].astype(np.int64), item_counts, width)

    def in_profile(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        """Whether each (user, item) is in the user's profile."""
        found, _ = find_sorted(self.profile_keys, user.astype(np.int64) * self.width + item)
        return found

    def pair_count(self, c: np.ndarray, h: np.ndarray) -> np.ndarray:
        """n(c, h) for each pair."""
        found, at = find_sorted(self.pair_keys, c.astype(np.int64) * self.width + h)
        return np.where(found, self.pair_counts[at], 0) if len(at) else np.zeros(len(c), np.int64)

    def cosine(self, user: np.ndarray, c: np.ndarray, h: np.ndarray) -> np.ndarray:
        """cos(c, h) over the profiles of all train users but `user`."""
        own_c, own_h = self.in_profile(user, c), self.in_profile(user, h)
        n_ch = self.pair_count(c, h) - (own_c & own_h)
        n_c = self.item_counts[c] - own_c
        n_h = self.item_counts[h] - own_h
        denominator = np.sqrt(np.maximum(n_c, 1) * np.maximum(n_h, 1).astype(np.float64))
        return np.where((n_c > 0) & (n_h > 0), n_ch / denominator, 0.0)

    def affinity(self, behaviors: Behaviors) -> np.ndarray:
        """Mean cosine of each candidate with its impression's last COCLICK_HISTORY clicks."""
        cand_offsets = np.asarray(behaviors.candidate_offsets)
        out = np.zeros(int(cand_offsets[-1]), dtype=np.float64)
        imp_of = segment_ids(cand_offsets)
        hist = np.diff(behaviors.history_offsets).clip(max=COCLICK_HISTORY)
        per_candidate = hist[imp_of]
        ends = np.cumsum(per_candidate)
        lo = 0
        while lo < len(out):
            hi = int(np.searchsorted(ends, ends[lo] - per_candidate[lo] + PAIR_CHUNK, "right"))
            hi = max(hi, lo + 1)
            out[lo:hi] = self._chunk(behaviors, imp_of[lo:hi], np.arange(lo, hi))
            lo = hi
        return out

    def _chunk(self, b: Behaviors, imp: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Affinity of candidates at flat positions `cand` (impressions `imp`)."""
        offsets, pos = last_clicks(np.asarray(b.history_offsets), imp, COCLICK_HISTORY)
        sizes = np.diff(offsets)
        owner = np.repeat(np.arange(len(cand)), sizes)
        c = np.asarray(b.candidate_items)[cand][owner]
        h = np.asarray(b.history_items)[pos]
        user = np.asarray(b.user_index)[imp][owner]
        total = np.bincount(owner, self.cosine(user, c, h), minlength=len(cand))
        return total / np.maximum(sizes, 1)
