"""Ranking metrics of the MIND leaderboard: AUC, MRR, nDCG@5 and nDCG@10 per impression.

The definitions are those of the official scorer (msnews/MIND ``evaluate.py``): AUC as
``sklearn.metrics.roc_auc_score`` (tied scores get half credit); MRR as the sum of 1/rank over the
clicked candidates divided by the number of clicks; nDCG@k with gain ``2**label - 1`` and discount
``log2(rank + 1)`` divided by the ideal DCG. Candidates are ranked by descending score and, on equal
scores, the later candidate ranks first: the order ``np.argsort(scores, kind="stable")[::-1]``.
The official script calls ``np.argsort`` without ``kind``; numpy's default sort is not stable, so
there the order of tied candidates (and with it MRR and nDCG, never AUC) depends on the numpy build
and CPU. Here it is fixed. Impressions without a click or with only clicks have no AUC; they are
skipped and counted (the official script stops with an error on them).

Impressions are CSR segments: the candidates of impression ``i`` are ``offsets[i]:offsets[i + 1]``
of the flat ``scores`` and ``labels``. All impressions are scored together: one sort of packed
64-bit keys (impression, score, position) per chunk of a few million candidates, then segment sums.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
CHUNK_ROWS = 1 << 22  # candidates sorted at once; bounds the working memory (~70 bytes each)


@dataclass(frozen=True)
class ImpressionMetrics:
    """The metrics of every impression, NaN where the impression is not scored.

    Attributes:
        auc: (I,) float64 AUC per impression.
        mrr: (I,) float64 MRR.
        ndcg5: (I,) float64 nDCG@5.
        ndcg10: (I,) float64 nDCG@10.
        scored: (I,) bool, true where the impression has a click and a non-click.
    """

    auc: np.ndarray  # (I,) float64
    mrr: np.ndarray  # (I,) float64
    ndcg5: np.ndarray  # (I,) float64
    ndcg10: np.ndarray  # (I,) float64
    scored: np.ndarray  # (I,) bool: at least one click and one non-click

    def summary(self) -> dict[str, float | int]:
        """Means over the scored impressions (keys `auc`, `mrr`, `ndcg5`, `ndcg10`) and the
        counts of scored (`impressions`) and `skipped` impressions."""
        count = int(self.scored.sum())
        means = {
            name: float(getattr(self, name)[self.scored].mean()) if count else float("nan")
            for name in METRICS
        }
        return {**means, "impressions": count, "skipped": int(self.scored.size - count)}


def evaluate_scores(
    scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray
) -> dict[str, float | int]:
    """The leaderboard's metrics of a whole split, as the official MIND scorer computes them.

    Args:
        scores: (C,) scores of all candidates, impression after impression.
        labels: (C,) 1 for a click, 0 otherwise.
        offsets: (I+1,) CSR offsets: impression i is `scores[offsets[i]:offsets[i + 1]]`.

    Returns:
        Mean `auc`, `mrr`, `ndcg5` and `ndcg10` over the scored impressions, and the counts
            of scored (`impressions`) and `skipped` impressions (no click, or only clicks).

    Raises:
        ValueError: Misaligned inputs, bad offsets or scores that are not finite.
    """
    return impression_metrics(scores, labels, offsets).summary()


def impression_metrics(
    scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray, chunk_rows: int = CHUNK_ROWS
) -> ImpressionMetrics:
    """AUC, MRR, nDCG@5 and nDCG@10 of every impression (NaN where skipped).

    Args:
        scores: (C,) scores of all candidates, impression after impression.
        labels: (C,) 1 for a click, 0 otherwise.
        offsets: (I+1,) CSR offsets of the impressions.
        chunk_rows: Candidates sorted at once, which bounds the working memory.
    """
    scores, labels, offsets = _check_inputs(scores, labels, offsets)
    num = len(offsets) - 1
    out = {name: np.full(num, np.nan) for name in METRICS}
    scored = np.zeros(num, dtype=bool)
    chunks = list(impression_chunks(offsets, chunk_rows))
    for a, b in tqdm(chunks, desc="metrics", unit="chunk", leave=False, disable=len(chunks) < 8):
        lo, hi = offsets[a], offsets[b]
        sizes = np.diff(offsets[a : b + 1])
        if hi == lo:
            continue
        ranked = _rank_segments(scores[lo:hi], sizes)
        chunk = _chunk_metrics(ranked, labels[lo:hi][ranked.order], sizes)
        ok = chunk.pop("scored")
        scored[a:b] = ok
        for name, values in chunk.items():
            out[name][a:b][ok] = values[ok]
    logger.debug("scored %d of %d impressions", scored.sum(), num)
    return ImpressionMetrics(**out, scored=scored)


def ranks_from_scores(scores: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The 1-based rank of every candidate within its impression (1: the highest score; on
    equal scores the later candidate first), as the leaderboard's prediction file lists them.

    Args:
        scores: (C,) scores of all candidates, impression after impression.
        offsets: (I+1,) CSR offsets of the impressions.

    Returns:
        (C,) int32 ranks.
    """
    scores = _check_scores(np.asarray(scores))
    offsets = check_offsets(np.asarray(offsets), len(scores))
    ranks = np.empty(len(scores), dtype=np.int32)
    for a, b in impression_chunks(offsets, CHUNK_ROWS):
        lo, hi = offsets[a], offsets[b]
        if hi > lo:
            ranked = _rank_segments(scores[lo:hi], np.diff(offsets[a : b + 1]))
            ranks[lo + ranked.order] = ranked.rank
    return ranks


def impression_chunks(
    offsets: np.ndarray, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[int, int]]:
    """Impression ranges [a, b) of at most `chunk_rows` candidates (or one impression)."""
    pos_bits = _position_bits(np.diff(offsets))
    max_impressions = 1 << (32 - pos_bits)  # segment and position share 32 key bits
    a, num = 0, len(offsets) - 1
    while a < num:
        b = int(np.searchsorted(offsets, offsets[a] + chunk_rows, side="right")) - 1
        b = min(max(b, a + 1), a + max_impressions, num)
        yield a, b
        a = b


def check_offsets(offsets: np.ndarray, length: int) -> np.ndarray:
    """Validate CSR offsets over `length` rows; return them as int64."""
    if offsets.ndim != 1 or offsets.size == 0 or offsets.dtype.kind not in "iu":
        raise ValueError("offsets must be a non-empty flat integer array")
    if offsets[0] != 0 or offsets[-1] != length:
        raise ValueError(f"offsets must run from 0 to {length}, got {offsets[0]}..{offsets[-1]}")
    if np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be non-decreasing")
    return offsets.astype(np.int64, copy=False)


class _Ranked(NamedTuple):
    """Candidates of a chunk sorted ascending by (score, position) within each impression."""

    order: np.ndarray  # (R,) int64: chunk row of the candidate at each sorted place
    keys: np.ndarray  # (R,) uint64: its score key (equal keys <=> equal scores)
    rank: np.ndarray  # (R,) int64: its 1-based rank, descending score, later candidate first


def _rank_segments(scores: np.ndarray, sizes: np.ndarray) -> _Ranked:
    """Sort every segment by one sort of keys (segment | score key | position)."""
    pos_bits = _position_bits(sizes)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)  # (R,) first row of each row's segment
    key = np.repeat(np.arange(len(sizes), dtype=np.uint64), sizes) << np.uint64(32 + pos_bits)
    key |= _score_keys(scores) << np.uint64(pos_bits)
    key |= (np.arange(len(scores)) - starts).astype(np.uint64)
    key.sort()
    order = starts + (key & np.uint64((1 << pos_bits) - 1)).astype(np.int64)
    rank = starts + np.repeat(sizes, sizes) - np.arange(len(scores))
    return _Ranked(order, (key >> np.uint64(pos_bits)) & np.uint64(0xFFFFFFFF), rank)


def _chunk_metrics(ranked: _Ranked, labels: np.ndarray, sizes: np.ndarray) -> dict:
    """Per-impression metrics of one chunk, from labels in sorted order."""
    starts = np.cumsum(sizes) - sizes
    clicks = _segment_sum(labels, starts, sizes)
    rank = ranked.rank
    ideal = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, 12)))])
    out = {"scored": (clicks > 0) & (clicks < sizes)}
    with np.errstate(divide="ignore", invalid="ignore"):
        out["auc"] = _auc(ranked, labels, starts, sizes, clicks)
        out["mrr"] = _segment_sum(labels / rank, starts, sizes) / clicks
        for k in (5, 10):
            gains = np.where(rank <= k, (2.0**labels - 1) / np.log2(rank + 1), 0.0)
            dcg = _segment_sum(gains, starts, sizes)
            out[f"ndcg{k}"] = dcg / ideal[np.minimum(clicks, k).astype(np.int64)]
    return out


def _auc(
    ranked: _Ranked, labels: np.ndarray, starts: np.ndarray, sizes: np.ndarray, clicks: np.ndarray
) -> np.ndarray:
    """Mann-Whitney AUC per segment, average ranks for ties (as roc_auc_score)."""
    first = np.ones(len(labels), dtype=bool)  # first sorted place of each tie group
    first[1:] = ranked.keys[1:] != ranked.keys[:-1]
    first[starts[sizes > 0]] = True
    group_start = np.flatnonzero(first)
    group_len = np.diff(np.append(group_start, len(labels)))
    # ranks fall by one along a group: its mean descending rank is the first minus (len - 1) / 2
    mean_rank = ranked.rank[group_start] - (group_len - 1) / 2
    desc = _segment_sum(labels * mean_rank[np.cumsum(first) - 1], starts, sizes)
    pos_rank_sum = clicks * (sizes + 1) - desc  # sum of ascending ranks of the clicked
    return (pos_rank_sum - clicks * (clicks + 1) / 2) / (clicks * (sizes - clicks))


def _segment_sum(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sum of values over each segment (0 for empty segments)."""
    out = np.zeros(len(sizes))
    filled = sizes > 0
    out[filled] = np.add.reduceat(values, starts[filled], dtype=np.float64)
    return out


def _score_keys(scores: np.ndarray) -> np.ndarray:
    """32-bit keys in uint64 with the order and ties of `scores` (-0.0 ties with 0.0)."""
    as32 = scores.astype(np.float32)
    if scores.dtype != np.float32 and not np.array_equal(as32, scores):
        return np.unique(scores, return_inverse=True)[1].astype(np.uint64)
    bits = (as32 + np.float32(0)).view(np.uint32)
    flipped = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31))
    return flipped.astype(np.uint64)


def _position_bits(sizes: np.ndarray) -> int:
    """Bits needed for a candidate's position within its impression."""
    return int(max(int(sizes.max(initial=1)) - 1, 0)).bit_length()


def _check_inputs(
    scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate flat scores/labels and their CSR offsets; return them as arrays."""
    scores, labels = _check_scores(np.asarray(scores)), np.asarray(labels)
    if labels.shape != scores.shape:
        raise ValueError(f"labels have shape {labels.shape}, scores {scores.shape}")
    offsets = check_offsets(np.asarray(offsets), len(scores))
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        i = int(bad[0])
        hint = " (an unlabelled split?)" if labels[i] == -1 else ""
        raise ValueError(
            f"labels must be 0 or 1; candidate {i} of impression "
            f"{_impression_of(offsets, i)} has {labels[i]}{hint}"
        )
    return scores, labels.astype(np.int8, copy=False), offsets


def _check_scores(scores: np.ndarray) -> np.ndarray:
    if scores.ndim != 1:
        raise ValueError(f"scores must be a flat array, got shape {scores.shape}")
    if scores.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            raise ValueError(f"score of candidate {bad[0]} is {scores[bad[0]]}")
    elif scores.dtype.kind not in "iub":
        raise ValueError(f"scores must be numbers, got dtype {scores.dtype}")
    return scores


def _impression_of(offsets: np.ndarray, row: int) -> int:
    return int(np.searchsorted(offsets, row, side="right")) - 1
