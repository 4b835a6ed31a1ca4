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
  profile holds the items. A user's profile is the set of the last `profile` clicks of the
  history of their latest impression (any log) before the cutoff. 0 for an item in no profile.
  `prepare` takes profiles of 50 clicks (as many as the ranker reads), or fewer, down to 10,
  where the logs have so many users that the profiles' pairs could pass 2 ** 23
  (`profile_length`: 50 on MovieLens 100K, 24 on MIND-small-sized logs, 10 at MIND-large
  size); the store's manifest records the length, and the server's state reads it.
- history_len: log1p(clicks in the impression's history), the same for all its candidates.

The batch face walks the periods in order over all logs at once: the impressions of a period
read dense per-item counts (clicks, exposures, profile holders) and the profile pair counts
(`PairCounts`: sorted keys in buckets, 10 to 12 bytes a pair held, only pairs of the current
profiles), then add their own clicks, exposures and profiles (a user whose history is unchanged
keeps its profile as it is; the last period's profiles are read by no one and not counted).
Exposures within a period come from one sort of its candidates by (item, time);
co-click pairs are looked up in chunks. Each period's rows go to a temporary file as they are
computed; the split files are then written from it in log order, a few impressions at a time.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mmnewsrec.csr import csr_offsets, segment_ids
from mmnewsrec.files import atomic_file
from mmnewsrec.formats.store import (
    DAY,
    NEVER,
    SIGNAL_NAMES,
    Behaviors,
    Store,
    first_appearance,
)
from mmnewsrec.growing import GrowingRows, append_rows

logger = logging.getLogger(__name__)

COCLICK_HISTORY = 10  # last clicks of a history that a candidate's co-click is averaged over
COCLICK_PROFILE = 50  # last clicks of a user's latest history that make its co-click profile
COCLICK_PROFILE_MIN = 10  # ... or fewer, down to this, where the pairs could pass PROFILE_PAIRS
PROFILE_PAIRS = 2**23  # pairs of items the profiles can hold at once (10 to 12 bytes each)
LAG = DAY  # seconds: clicks count from impressions before the start of the impression's period
FILTER_BITS = 8  # least bits a pair of each of the two Bloom filters of `PairCounts`
PAIR_BUCKET_BITS = 31  # `PairCounts` holds its keys in buckets of 2 ** 31 consecutive keys
PAIR_LOW_MASK = (1 << PAIR_BUCKET_BITS) - 1  # a key's bits within its bucket
PAIR_CHUNK = 4_000_000  # (candidate, history click) pairs looked up at once
PROFILE_CHUNK = 100_000  # profiles whose pairs are made at once
SAVE_ROWS = 65_536  # impressions whose signals are written to their split's file at once
SIGNALS_VERSION = 4  # 3: co-click profiles before the cutoff, in every log; 4: their length


def build_signals(
    splits: Mapping[str, Behaviors],
    num_news: int,
    folder: Path,
    train_split: str = "train",
    lag: int = LAG,
    history: int = COCLICK_HISTORY,
    profile: int | None = None,
) -> dict[str, object]:
    """Compute every split's signals into folder/<split>.npy; returns the manifest entry.
    `profile`: the co-click profiles' length; None: `profile_length` of the logs.

    The periods' rows go to a temporary file as they are computed, then each split's file is
    written from it in log order, SAVE_ROWS impressions at a time: the (C, 5) table is never
    whole in memory."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    train = splits.get(train_split)
    train = train if train is not None and train.labelled else None
    logs = list(splits.values())
    first = first_appearance(logs, num_news)
    imps = Impressions.concat(logs, [b is train for b in logs])
    longest = longest_histories(imps)
    profile = profile_length(longest) if profile is None else profile
    pairs = PairCounts(len(first), profile_capacity(longest, profile))
    order, bounds = group_by_period(imps.times, lag)
    with tempfile.TemporaryFile(dir=folder) as spill:
        for block in period_signals(imps, order, bounds, first, lag, history, profile, pairs):
            block.tofile(spill)
        ends = dict(zip(splits, np.cumsum([b.num_impressions for b in logs]).tolist(), strict=True))
        save_in_log_order(spill, order, imps.candidate_offsets, ends, folder)
    logger.info("signals computed in %.1f s", time.perf_counter() - started)
    return {
        "names": list(SIGNAL_NAMES),
        "train_split": train_split if train else None,
        "version": SIGNALS_VERSION,
        "lag": lag,
        "history": history,
        "profile": profile,
    }


def save_in_log_order(
    spill: BinaryIO,
    order: np.ndarray,
    candidate_offsets: np.ndarray,
    ends: Mapping[str, int],
    folder: Path,
) -> None:
    """Write folder/<split>.npy from `spill`, the rows of the impressions' candidates in the
    impressions' `order`; `ends`: the impression each split ends before, in log order."""
    sizes = np.diff(candidate_offsets)
    start = np.empty(len(order), np.int64)  # each impression's first row in the spill
    start[order] = csr_offsets(sizes[order])[:-1]
    spill.flush()
    length = os.fstat(spill.fileno()).st_size
    mapped = mmap.mmap(spill.fileno(), length, access=mmap.ACCESS_READ) if length else None
    rows = np.frombuffer(mapped or b"", np.float32).reshape(-1, len(SIGNAL_NAMES))
    lo = 0
    for name, hi in ends.items():
        shape = (int(candidate_offsets[hi] - candidate_offsets[lo]), len(SIGNAL_NAMES))
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        with atomic_file(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for a in range(lo, hi, SAVE_ROWS):
                counts = sizes[a : min(a + SAVE_ROWS, hi)]
                own = csr_offsets(counts)
                pos = np.repeat(start[a : a + len(counts)] - own[:-1], counts) + np.arange(own[-1])
                rows[pos].tofile(f)
                if mapped is not None:
                    mapped.madvise(mmap.MADV_DONTNEED)  # the pages read leave the RSS
        logger.info("signals of %s: %d candidates", name, shape[0])
        lo = hi
    del rows
    if mapped is not None:
        mapped.close()


def log_share(count: np.ndarray, total: np.ndarray | int) -> np.ndarray:
    """log((count + 1) / (total + 1))."""
    return np.log1p(count) - np.log1p(total)


def add_counts(counts: np.ndarray, items: np.ndarray) -> None:
    """counts[item] += 1 for each of `items` (repeats count): a pass over `counts` for many
    items, in place for a few (one impression's, at serving time, against 100k news)."""
    if len(items) * 64 < len(counts):
        np.add.at(counts, items, 1)
    else:
        counts += np.bincount(items, minlength=len(counts))


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


def group_by_period(times: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """(impressions in period order, log order within a period; (P + 1,) bounds of each
    period's impressions)."""
    period = times // lag
    periods = np.unique(period)
    rank = np.searchsorted(periods, period)
    small = rank.astype(np.uint16) if len(periods) < 2**16 else rank  # radix sort
    order = np.argsort(small, kind="stable")
    return order, np.searchsorted(rank[order], np.arange(len(periods) + 1))


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
        """`counted`: per log, whether its clicks count. One log's arrays are not copied."""
        empty = np.zeros(0, dtype=np.int64)

        def joined(parts: list[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
            return parts[0] if len(parts) == 1 else np.concatenate([np.zeros(0, dtype), *parts])

        def flat(name: str, dtype: type[np.integer] = np.int64) -> np.ndarray:
            return joined([np.asarray(getattr(b, name), dtype=dtype) for b in logs], dtype)

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
            joined(clicks, np.bool_),
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


def profile_pairs(
    imps: Impressions, rows: np.ndarray, width: int, profile: int
) -> tuple[np.ndarray, np.ndarray]:
    """The profiles (each the set of the last `profile` clicks) of the impressions `rows`, all
    together: (their items, their pair keys x * width + y of x < y)."""
    offsets, pos = last_clicks(imps.history_offsets, rows, profile)
    owner = np.repeat(np.arange(len(rows)), np.diff(offsets))
    keys = np.sort(owner * width + imps.history_items[pos])
    first_of = np.ones(len(keys), dtype=bool)
    first_of[1:] = keys[1:] != keys[:-1]
    keys = keys[first_of]  # a set per profile, sorted
    owner, item = np.divmod(keys, width)
    ends = csr_offsets(np.bincount(owner, minlength=len(rows)))[owner + 1]
    # x at position i pairs with positions i + 1 .. the end of its profile
    after = ends - np.arange(len(item)) - 1
    second = np.repeat(np.arange(1, len(item) + 1) - csr_offsets(after)[:-1], after)
    second += np.arange(len(second))
    keys = np.repeat(item * width, after)
    keys += item[second]
    return item, keys


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


class PairCounts:
    """Counts of item pairs (x, y), x < y < width, by key x * width + y, in buckets of
    2 ** PAIR_BUCKET_BITS consecutive keys: each holds its keys' low bits, sorted and unique
    (uint32), and their int32 counts (never 0). Two one-hash Bloom filters of the pairs (8 to 16
    bits a pair each, hashed from random codes of the two items) rule out most absent pairs
    before any key is made: 10 to 12 bytes a pair held. Read and updated a whole array of pairs
    at a time; `stage` collects updates (8 bytes a pair) that `merge` applies a bucket at a time,
    so that an update never holds two copies of all the pairs. `capacity`: the pairs the filters
    are sized for at least, so that they need not be built again as the pairs grow to it."""

    def __init__(self, width: int, capacity: int = 0) -> None:
        self.width = width
        self.capacity = capacity  # pairs the filters are sized for at least (see `filter_bits`)
        buckets = ((width * width - 1) >> PAIR_BUCKET_BITS) + 1
        self._edges = np.arange(buckets + 1, dtype=np.int64) << PAIR_BUCKET_BITS
        self._low = [np.zeros(0, np.uint32) for _ in range(buckets)]
        self._counts = [np.zeros(0, np.int32) for _ in range(buckets)]
        self._staged: list[list[np.ndarray]] = [[] for _ in range(buckets)]  # see `stage`
        self._size = 0
        # two codes per item, and two for `width` (padding, in no pair)
        self._codes = np.random.default_rng(0).integers(0, 2**32, (2, width + 1), np.uint32)
        self._filters: np.ndarray | None = None  # (2, bytes) of the pairs held; None: to build

    def __len__(self) -> int:
        return self._size

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, counts) of the pairs held, in key order."""
        counts = np.concatenate([np.zeros(0, np.int32), *self._counts])
        return np.concatenate([np.zeros(0, np.int64), *self._held_keys()]), counts

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The count of each key (0 if absent)."""
        out = np.zeros(len(keys), np.int32)
        if not self._size:
            return out
        order = sort_order(keys)  # a search in sorted order is several times faster
        wanted = keys[order]
        bounds = np.searchsorted(wanted, self._edges).tolist()
        low = (wanted & PAIR_LOW_MASK).astype(np.uint32)
        found = np.zeros(len(keys), np.int32)  # in `wanted` order
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            held, lo, hi = self._low[b], bounds[b], bounds[b + 1]
            if not len(held):
                continue
            pos = np.searchsorted(held, low[lo:hi])
            np.minimum(pos, len(held) - 1, out=pos)
            found[lo:hi] = np.where(held[pos] == low[lo:hi], self._counts[b][pos], 0)
        out[order] = found
        return out

    def add(self, keys: np.ndarray, deltas: np.ndarray) -> None:
        """counts[key] += delta (a key may come several times); a key whose count becomes 0
        is dropped."""
        self.stage(keys, deltas)
        self.merge()

    def stage(self, keys: np.ndarray, deltas: np.ndarray) -> None:
        """Keep counts[key] += delta for the next `merge`."""
        keys = np.asarray(keys, np.int64)
        bucket = keys >> PAIR_BUCKET_BITS
        bounds = csr_offsets(np.bincount(bucket, minlength=len(self._low)))
        small = bucket.astype(np.uint16) if len(self._low) <= 2**16 else bucket  # radix sort
        del bucket
        order = np.argsort(small, kind="stable")
        del small
        staged = keys[order]  # (low bits, delta as uint32) as one int64: sorted faster
        staged &= PAIR_LOW_MASK
        staged <<= 32
        staged |= np.asarray(deltas, np.int32)[order].view(np.uint32)
        for b in np.flatnonzero(np.diff(bounds)):
            self._staged[b].append(staged[bounds[b] : bounds[b + 1]])

    def merge(self) -> None:
        """Apply the staged updates, a bucket at a time: counts[key] += delta; a key whose
        count becomes 0 is dropped."""
        staged = sum(len(part) for parts in self._staged for part in parts)
        bits = filter_bits(max(self.capacity, self._size + staged))  # after the merge: at most
        if self._filters is not None and self._filters.shape[1] << 3 != 1 << bits:
            self._filters = None  # built again, larger, when next read
        for b, parts in enumerate(self._staged):
            if not parts:
                continue
            both = np.sort(np.concatenate(parts))
            self._staged[b] = []
            low, deltas = (both >> 32).astype(np.uint32), (both & 0xFFFFFFFF).astype(np.uint32)
            del both
            deltas = deltas.view(np.int32)
            starts = np.flatnonzero(np.r_[True, low[1:] != low[:-1]])
            deltas, low = np.add.reduceat(deltas, starts), low[starts]
            held, counts = self._low[b], self._counts[b]
            pos = np.searchsorted(held, low)
            found = pos < len(held)
            found[found] = held[pos[found]] == low[found]
            counts[pos[found]] += deltas[found]
            new = ~found & (deltas != 0)
            held = np.insert(held, pos[new], low[new])
            counts = np.insert(counts, pos[new], deltas[new])
            live = counts != 0
            if not live.all():
                held, counts = held[live], counts[live]
                self._filters = None  # a filter cannot forget a pair: built again
            elif self._filters is not None:
                self._mark(self._edges[b] + low[new])
            self._low[b], self._counts[b] = held, counts
        self._size = sum(len(low) for low in self._low)

    def may_hold(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per pair of items (x, y broadcast together, either order): False for a pair surely
        absent; true for a held pair and ~0.4-1.4% of the absent ones (the second filter tests
        only the pairs that the first lets through)."""
        if not self._size:
            return np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), bool)
        if self._filters is None:
            bits = filter_bits(max(self.capacity, self._size))
            self._filters = np.zeros((2, 1 << bits >> 3), np.uint8)
            for keys in self._held_keys():
                self._mark(keys)
        x, y = np.broadcast_arrays(x, y)
        held = self._passes(0, x, y)
        through = np.flatnonzero(held)  # flat: several times faster to index than by axes
        held.reshape(-1)[through] = self._passes(1, x.flat[through], y.flat[through])
        return held

    def _held_keys(self) -> Iterator[np.ndarray]:
        """The keys held (int64), in order, at most PAIR_CHUNK at a time."""
        for start, low in zip(self._edges.tolist(), self._low, strict=False):
            for lo in range(0, len(low), PAIR_CHUNK):
                yield start + low[lo : lo + PAIR_CHUNK].astype(np.int64)

    def _passes(self, k: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether filter `k` holds the bit of each pair (x, y broadcast together)."""
        assert self._filters is not None
        slot = self._slots(k, x, y)
        bit = (slot & 7).astype(np.uint8)
        slot >>= 3
        byte = np.take(self._filters[k], slot)
        byte >>= bit
        byte &= 1
        return byte.view(bool)

    def _mark(self, keys: np.ndarray) -> None:
        """Set the bits of `keys` in both filters."""
        assert self._filters is not None
        x, y = np.divmod(keys, self.width)
        for k in range(2):
            slot = np.sort(self._slots(k, x, y))
            byte = slot >> 3
            first = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]][: len(byte)])
            bits = np.left_shift(1, (slot & 7).astype(np.uint8), dtype=np.uint8)
            self._filters[k, byte[first]] |= np.bitwise_or.reduceat(bits, first)

    def _slots(self, k: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Filter `k`'s bit of each pair: the top bits of the xor of the items' codes."""
        assert self._filters is not None
        bits = (self._filters.shape[1] << 3).bit_length() - 1
        codes = self._codes[k]
        slot = codes[x] ^ codes[y]
        slot >>= np.uint32(32 - bits)
        return slot


def filter_bits(pairs: int) -> int:
    """log2 of the bits of each of `PairCounts`' filters for `pairs` pairs: at least
    FILTER_BITS a pair (at most 2**32)."""
    return min(32, max(6, (FILTER_BITS * pairs - 1).bit_length()))


def period_signals(
    imps: Impressions,
    order: np.ndarray,
    bounds: np.ndarray,
    first: np.ndarray,
    lag: int,
    history: int,
    profile: int,
    pairs: PairCounts,
) -> Iterator[np.ndarray]:
    """The (candidates, 5) rows of each period's impressions (`order[bounds[r]:bounds[r + 1]]`)
    in turn: what they see, then what they add. `first`: (N+1,) each item's first appearance
    (`first_appearance`); `history`, `profile`: the co-click's lengths; `pairs`: empty, to count
    the profiles' pairs n(x, y), x < y."""
    width = len(first)
    times = np.unique(imps.times)
    earlier = np.searchsorted(np.sort(imps.times), imps.times)  # impressions strictly before
    clicks, shown = np.zeros(width, np.int64), np.zeros(width, np.int64)
    total_clicks = 0
    holders = np.zeros(width, np.int64)  # n(x): profiles holding x
    profile_of = np.full(int(imps.users.max(initial=-1)) + 1, -1)  # impression per user
    for r in range(len(bounds) - 1):
        rows = order[bounds[r] : bounds[r + 1]]
        cand_offsets, cand = last_clicks(imps.candidate_offsets, rows, len(imps.candidate_items))
        items = imps.candidate_items[cand]
        block = np.empty((len(cand), len(SIGNAL_NAMES)), np.float32)
        block[:, 0] = log_share(clicks, total_clicks)[items]
        within = earlier_within(items, np.searchsorted(times, imps.times[rows]), cand_offsets)
        count = shown[items] + within  # log_share, its second term once per impression:
        block[:, 1] = np.log1p(count) - np.repeat(np.log1p(earlier[rows]), np.diff(cand_offsets))
        del within, count  # memory for the co-click's
        shown_at = np.repeat(imps.times[rows], np.diff(cand_offsets))
        block[:, 2] = np.log1p(np.maximum(shown_at - first[items], 0) / 3600.0)
        del shown_at
        block[:, 3] = coclick(imps, rows, cand_offsets, cand, holders, pairs, history)
        sizes = np.diff(imps.history_offsets)[rows]
        block[:, 4] = np.repeat(np.log1p(sizes), np.diff(cand_offsets))
        yield block
        counted = imps.counted[cand]
        clicks += np.bincount(items[counted], minlength=width)
        total_clicks += int(counted.sum())
        shown += np.bincount(items, minlength=width)
        del block, cand, items, counted  # memory for the pairs
        if r == len(bounds) - 2:
            break  # no later impression reads the last period's profiles
        # each user's latest impression of the period (log order among equal times)
        latest = rows[np.lexsort((rows, imps.times[rows], imps.users[rows]))]
        users = imps.users[latest]
        latest = latest[np.r_[users[1:] != users[:-1], True]]
        replaced = profile_of[imps.users[latest]]
        changed = ~same_profiles(imps, replaced, latest, profile)  # a profile kept: no change
        replaced, latest = replaced[changed], latest[changed]
        update_profiles(imps, replaced[replaced >= 0], latest, holders, pairs, profile)
        profile_of[imps.users[latest]] = latest


def longest_histories(imps: Impressions) -> np.ndarray:
    """Per user index, the clicks of their longest history."""
    longest = np.zeros(int(imps.users.max(initial=-1)) + 1, np.int64)
    np.maximum.at(longest, imps.users, np.diff(imps.history_offsets))
    return longest


def profile_capacity(longest: np.ndarray, profile: int) -> int:
    """The most pairs that profiles of `profile` clicks can hold at once: each user holds one,
    of at most the last `profile` clicks of their longest history (`longest`, per user)."""
    size = np.minimum(longest, profile)
    return int((size * (size - 1) // 2).sum())


def profile_length(longest: np.ndarray) -> int:
    """The longest co-click profile, of COCLICK_PROFILE_MIN to COCLICK_PROFILE clicks, whose
    pairs stay within PROFILE_PAIRS (`profile_capacity`); COCLICK_PROFILE_MIN if none does.
    Few users (MovieLens 100K, MIND-small) get long profiles, many (MIND-large) short ones."""
    for profile in range(COCLICK_PROFILE, COCLICK_PROFILE_MIN, -1):
        if profile_capacity(longest, profile) <= PROFILE_PAIRS:
            return profile
    return COCLICK_PROFILE_MIN


def update_profiles(
    imps: Impressions,
    gone: np.ndarray,
    new: np.ndarray,
    holders: np.ndarray,
    pairs: PairCounts,
    profile: int,
) -> None:
    """Replace the profiles (the last `profile` clicks) of the impressions `gone` by those of
    `new` in the item and pair counts: their pairs (~profile ** 2 / 2 each) are made
    PROFILE_CHUNK profiles at a time and staged, then merged into `pairs` at once."""
    width = len(holders)
    for sign, rows in ((-1, gone), (1, new)):
        for lo in range(0, len(rows), PROFILE_CHUNK):
            items, keys = profile_pairs(imps, rows[lo : lo + PROFILE_CHUNK], width, profile)
            holders += sign * np.bincount(items, minlength=width)
            pairs.stage(keys, np.full(len(keys), sign, np.int32))
            del items, keys
    pairs.merge()


def recent_clicks(imps: Impressions, rows: np.ndarray, history: int, pad: int) -> np.ndarray:
    """(len(rows), history) int32: the last `history` clicks of each impression's history,
    oldest first, padded at the end with `pad`."""
    offsets, pos = last_clicks(imps.history_offsets, rows, history)
    clicks = np.full((len(rows), history), pad, np.int32)
    column = np.arange(len(pos)) - np.repeat(offsets[:-1], np.diff(offsets))
    clicks[segment_ids(offsets), column] = imps.history_items[pos]
    return clicks


def same_profiles(imps: Impressions, old: np.ndarray, new: np.ndarray, profile: int) -> np.ndarray:
    """Per pair of impressions (old[k], new[k]; old[k] = -1 for none): whether they give the
    same profile (the same last `profile` clicks)."""
    same = old >= 0
    older, newer = (recent_clicks(imps, rows[same], profile, -1) for rows in (old, new))
    same[same] = (older == newer).all(axis=1)
    return same


def earlier_within(items: np.ndarray, time_rank: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For candidates of impressions with `time_rank` (CSR `offsets`): how many candidates of
    those impressions with a strictly smaller time rank have the same item."""
    key = items.astype(np.int64) * (int(time_rank.max(initial=0)) + 1)
    key += np.repeat(time_rank, np.diff(offsets))
    order = sort_order(key)  # equal keys get equal answers: no need for a stable sort
    key, item = key[order], items[order]
    new_item, new_run = np.r_[True, item[1:] != item[:-1]], np.r_[True, key[1:] != key[:-1]]
    del key, item  # the temporaries are as large as the period's candidates
    position = np.arange(len(order))
    item_start = np.maximum.accumulate(np.where(new_item, position, 0))
    run_start = np.maximum.accumulate(np.where(new_run, position, 0))
    del position
    run_start -= item_start
    out = np.empty(len(order), np.int64)
    out[order] = run_start
    return out


def sort_order(keys: np.ndarray) -> np.ndarray:
    """np.argsort of non-negative int64 `keys`, equal keys in any order: when the keys and their
    positions fit in 63 bits together, one sort of the keys with their positions in the low
    bits (numpy sorts values several times faster than it argsorts them)."""
    shift = max(1, (len(keys) - 1).bit_length())
    if not len(keys) or int(keys.max()) >> (63 - shift):
        return np.argsort(keys)
    packed = keys.astype(np.int64) << shift
    packed |= np.arange(len(keys))
    packed.sort()
    packed &= (1 << shift) - 1
    return packed


def coclick(
    imps: Impressions,
    rows: np.ndarray,
    cand_offsets: np.ndarray,
    cand: np.ndarray,
    holders: np.ndarray,
    pairs: PairCounts,
    history: int,
) -> np.ndarray:
    """Mean cosine of each candidate (flat positions `cand` of impressions `rows`, CSR
    `cand_offsets`) with its impression's last `history` clicks, PAIR_CHUNK pairs at a time."""
    width = len(holders)
    clicks = recent_clicks(imps, rows, history, width)  # padded with an item in no profile
    clicks = clicks.astype(np.int64)  # int64 indices gather several times faster
    sizes = np.minimum(np.diff(imps.history_offsets)[rows], history)
    imp = segment_ids(cand_offsets)
    out = np.zeros(len(cand))
    step = max(1, PAIR_CHUNK // history)
    for lo in range(0, len(cand), step):
        c = imps.candidate_items[cand[lo : lo + step]]
        h = clicks[imp[lo : lo + step]]  # (candidates, history)
        n_c = holders[c]
        look = np.flatnonzero(pairs.may_hold(c[:, None], h))  # else n(c, h) = 0
        owner, h_look = look // history, h.ravel()[look]
        other = c[owner] != h_look  # n(c, c) is no pair: below
        owner, h_look = owner[other], h_look[other]
        x, y = np.minimum(c[owner], h_look), np.maximum(c[owner], h_look)
        n_ch = pairs.get(x.astype(np.int64) * width + y)
        hit = n_ch > 0  # then n(c) and n(h) > 0
        cos = n_ch[hit] / np.sqrt((n_c[owner[hit]] * holders[h_look[hit]]).astype(np.float64))
        total = np.bincount(owner[hit], cos, minlength=len(c))
        same = np.flatnonzero(h == c[:, None]) // history  # cos(c, c) = 1 for c in a profile
        total += np.bincount(same, minlength=len(c)) * (n_c > 0)
        out[lo : lo + step] = total / np.maximum(sizes[imp[lo : lo + step]], 1)
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
    user profiles (the last `profile` clicks of their latest history, by user index) and the
    co-occurrence counts of their items (a `PairCounts`; about `profile` ** 2 / 2 pairs per user),
    which change when a period starts. `to_arrays` / `from_arrays`: all of it as named arrays.
    """

    def __init__(
        self,
        num_news: int,
        lag: int = LAG,
        history: int = COCLICK_HISTORY,
        profile: int = COCLICK_PROFILE,
    ) -> None:
        if min(lag, history, profile) <= 0:
            raise ValueError(f"lag, history and profile must be > 0: {lag}, {history}, {profile}")
        self.lag, self.history, self.profile = lag, history, profile
        self.num_news = 0
        self.clicks = np.zeros(1, np.int64)  # clicks before the current period
        self.total_clicks = 0
        self.shown = np.zeros(1, np.int64)  # impressions before the current time showing each
        self.impressions = 0
        self.first_seen = np.full(1, NEVER, np.int64)
        self.profiles: dict[int, np.ndarray] = {}  # a set: items may repeat
        self.holders = np.zeros(1, np.int64)  # n(x): profiles holding x
        self.pairs = PairCounts(1)  # n(x, y) of x < y as x * (num_news + 1) + y
        self.time: int | None = None  # the latest time observed or asked for
        self._period_clicks = np.zeros(1, np.int64)  # clicks of the current period
        self._period_profiles: dict[int, np.ndarray] = {}  # latest history of each user in it
        self._now_shown: list[np.ndarray] = []  # news shown by impressions of the current time
        self._now_count = 0  # those impressions
        self._grown: dict[str, GrowingRows] = {}  # the per-news counts as news are added
        self.grow(num_news)

    @classmethod
    def empty(cls, num_news: int, **settings: int) -> SignalState:
        """A state that has seen nothing; settings: `lag` (seconds), `history`, `profile`
        (clicks)."""
        return cls(num_news, **settings)

    @classmethod
    def for_store(cls, store: Store, num_news: int) -> SignalState:
        """A state that has seen nothing, with the settings of the store's signals."""
        settings = store.manifest.get("signals", {})
        lag, history = settings.get("lag", LAG), settings.get("history", COCLICK_HISTORY)
        profile = settings.get("profile", history)  # a store written before profile: the same
        return cls(num_news, lag=lag, history=history, profile=profile)

    def grow(self, num_news: int) -> None:
        """Make room for news indices up to `num_news` (news added at serving time)."""
        extra = num_news - self.num_news
        if extra < 0:
            raise ValueError(f"cannot shrink from {self.num_news} to {num_news} news")
        zeros, grown = np.zeros(extra, np.int64), self._grown
        self.clicks = append_rows(grown, "clicks", self.clicks, zeros)
        self.shown = append_rows(grown, "shown", self.shown, zeros)
        never = np.full(extra, NEVER, np.int64)
        self.first_seen = append_rows(grown, "first_seen", self.first_seen, never)
        self.holders = append_rows(grown, "holders", self.holders, zeros)
        self._period_clicks = append_rows(grown, "period_clicks", self._period_clicks, zeros)
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
        self._period_profiles[int(user)] = history[-self.profile :]
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
        candidate_impression = segment_ids(imps.candidate_offsets)
        candidate_time = times[candidate_impression]
        np.minimum.at(self.first_seen, imps.candidate_items, candidate_time)
        np.minimum.at(
            self.first_seen, imps.history_items, np.repeat(times, np.diff(imps.history_offsets))
        )
        # exposures: impressions before the batch's last time count, those at it wait
        now = candidate_time == last
        if self.time is None or last > self.time:
            self._flush_shown()
            add_counts(self.shown, imps.candidate_items[~now])
            self.impressions += int((times < last).sum())
        self._now_shown.append(imps.candidate_items[now].astype(np.int64))
        self._now_count += int((times == last).sum())
        # clicks and profiles: those of periods before the last one count, its own wait
        period, current = times // self.lag, last // self.lag
        before = period < current
        clicked = imps.counted.astype(bool)
        early = clicked & before[candidate_impression]
        late_clicks = imps.candidate_items[clicked & ~early]
        if np.any(before) or (self.time is not None and current > self.time // self.lag):
            add_counts(self._period_clicks, imps.candidate_items[early])
            self._period_profiles.update(self._latest_histories(imps, np.flatnonzero(before)))
            self._flush_period()
        add_counts(self._period_clicks, late_clicks)
        self._period_profiles.update(self._latest_histories(imps, np.flatnonzero(~before)))
        self.time = last

    def _latest_histories(self, imps: Impressions, rows: np.ndarray) -> dict[int, np.ndarray]:
        """The last `profile` clicks of each user's latest impression among `rows`."""
        users = imps.users[rows][::-1]
        _, last = np.unique(users, return_index=True)
        latest = rows[::-1][np.sort(last)][::-1]  # in row order
        offsets, pos = last_clicks(imps.history_offsets, latest, self.profile)
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
        keys = np.minimum(c[look], h[look]) * (self.num_news + 1) + np.maximum(c[look], h[look])
        n_ch[look] = self._pair_counts().get(keys)
        cos = np.where(n_ch > 0, n_ch / np.sqrt(np.maximum(n_c * n_h, 1).astype(np.float64)), 0)
        return cos.reshape(len(candidates), len(history)).sum(axis=1) / len(history)

    def _pair_counts(self) -> PairCounts:
        """`pairs`, their keys made again for the number of news if news were added."""
        if self.pairs.width != self.num_news + 1:
            keys, counts = self.pairs.items()
            x, y = np.divmod(keys, self.pairs.width)
            self.pairs = PairCounts(self.num_news + 1)
            self.pairs.add(x * (self.num_news + 1) + y, counts)
        return self.pairs

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
            add_counts(self.shown, np.concatenate(self._now_shown))
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
        self._pair_counts().add((x * width + y)[~own], sign[~own].astype(np.int32))
        self.profiles.update(new)

    # ------------------------------------------------------------------ as arrays

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything the state holds, as named arrays (`from_arrays` gives the state back):
        two states that hold the same give equal arrays."""
        keys, counts = self.pairs.items()  # sorted, counts never 0
        x, y = np.divmod(keys, self.pairs.width)
        shown = np.concatenate([np.zeros(0, np.int64), *self._now_shown])
        now_shown = np.bincount(shown, minlength=len(self.shown))  # counts: order-free, small
        scalars = [self.lag, self.history, self.profile, self.num_news]
        scalars += [-1 if self.time is None else self.time]
        scalars += [self.total_clicks, self.impressions, self._now_count]
        return {
            "scalars": np.array(scalars, np.int64),
            "clicks": self.clicks,
            "shown": self.shown,
            "first_seen": self.first_seen,
            "holders": self.holders,
            "pair_keys": x << 32 | y,
            "pair_counts": counts.astype(np.int64),
            "period_clicks": self._period_clicks,
            "now_shown": now_shown,
            **as_rows("profile", self.profiles),
            **as_rows("period_profile", self._period_profiles),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> SignalState:
        """The state `to_arrays` gave."""
        lag, history, profile, num_news, at, total_clicks, impressions, now_count = arrays[
            "scalars"
        ].tolist()
        state = cls(num_news, lag=lag, history=history, profile=profile)
        state.time = None if at < 0 else at
        state.total_clicks, state.impressions, state._now_count = (
            total_clicks,
            impressions,
            now_count,
        )
        for name in ("clicks", "shown", "first_seen", "holders"):
            setattr(state, name, np.array(arrays[name], np.int64))
        state._period_clicks = np.array(arrays["period_clicks"], np.int64)
        keys = np.asarray(arrays["pair_keys"])
        state.pairs = PairCounts(num_news + 1)
        state.pairs.add(
            (keys >> 32) * (num_news + 1) + (keys & 0xFFFFFFFF),
            np.asarray(arrays["pair_counts"], np.int32),
        )
        shown = np.asarray(arrays["now_shown"])
        state._now_shown = [np.repeat(np.arange(len(shown)), shown)] if now_count else []
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


def replay_store(signals: SignalState, store: Store, train_split: str) -> None:
    """Feed `signals` the store's impressions in time order: the train split with its clicks,
    the other splits without theirs, as `prepare` counts them."""
    logs = [store.behaviors(split) for split in store.splits]
    imps = Impressions.concat(logs, [b.split == train_split and b.labelled for b in logs])
    signals.observe_batch(imps.take(np.argsort(imps.times, kind="stable")))
