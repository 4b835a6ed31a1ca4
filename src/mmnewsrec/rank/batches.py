"""Training samples and batches as integer index tensors; models gather the news vectors.

Listwise training turns every click of a labelled impression into one sample: the clicked news
(column 0) and K distinct negatives drawn from the same impression, fresh each epoch. An impression
with fewer than K negatives gives all of them, in random order, and pads the rest with index 0,
which the models score 0 and the losses mask out (no negative counts twice). Pointwise training
uses the same rows with a binary loss and also keeps clicks whose impression has no negative
(all their negative columns are padding). Evaluation rows cut each impression's candidates into
fixed-width chunks so that any number of candidates scores in bounded memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from mmnewsrec.csr import csr_offsets, segment_ids

logger = logging.getLogger(__name__)


class BehaviorArrays(Protocol):
    """The CSR arrays of `mmnewsrec.data.store.Behaviors` that batching reads."""

    history_offsets: np.ndarray
    history_items: np.ndarray
    candidate_offsets: np.ndarray
    candidate_items: np.ndarray
    candidate_labels: np.ndarray


@dataclass
class Batch:
    """One batch of index tensors. Candidate index 0 is padding and never counts."""

    history: torch.Tensor  # (B, L) int64, left-padded, most recent click last
    candidates: torch.Tensor  # (B, C) int64
    labels: torch.Tensor  # (B, C) float32, 1 = clicked
    signals: torch.Tensor | None = None  # (B, C, F) float32 behaviour signals; 0 for padding

    def __len__(self) -> int:
        return self.history.shape[0]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with `fn` applied to every tensor."""
        signals = None if self.signals is None else fn(self.signals)
        return Batch(fn(self.history), fn(self.candidates), fn(self.labels), signals)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to `device`."""
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-lock the tensors (called by DataLoader(pin_memory=True))."""
        return self.apply(lambda t: t.pin_memory())


def gather_signals(signals: np.ndarray | None, pos: np.ndarray) -> torch.Tensor | None:
    """(..., F) float32 signals of the flat candidate positions `pos` (-1: padding, zeros)."""
    if signals is None:
        return None
    rows = np.asarray(signals[np.clip(pos, 0, None)], dtype=np.float32)
    return torch.from_numpy(np.where((pos >= 0)[..., None], rows, 0.0).astype(np.float32))


def gather_history(
    offsets: np.ndarray, items: np.ndarray, rows: np.ndarray, length: int
) -> np.ndarray:
    """The last `length` history items of each row, left-padded with 0: (len(rows), length)."""
    rows = np.asarray(rows, dtype=np.int64)
    start, end = offsets[rows], offsets[rows + 1]
    pos = end[:, None] - length + np.arange(length)[None, :]  # (R, L), last position = end - 1
    valid = pos >= start[:, None]
    if items.size == 0:
        return np.zeros(pos.shape, dtype=np.int64)
    return np.where(valid, items[np.clip(pos, 0, None)], 0).astype(np.int64)


def sample_negatives(
    base: np.ndarray, count: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """K distinct positions into segments [base, base + count), or -1 (padding) in the columns
    beyond `count` when count < k.

    Floyd's algorithm column by column, so the cost is O(S * k^2) for S rows. A row with
    count < k fills its last `count` columns with the whole segment and its first ones with -1.
    """
    s = len(count)
    u = rng.random((s, k))
    chosen = np.full((s, k), -1, dtype=np.int64)
    for col in range(k):
        j = count - k + col  # Floyd: draw t in [0, j]; if taken, take j instead
        t = (u[:, col] * (j + 1)).astype(np.int64)
        taken = (chosen[:, :col] == t[:, None]).any(axis=1)
        chosen[:, col] = np.where(j >= 0, np.where(taken, j, t), -1)
    return np.where(chosen >= 0, base[:, None] + chosen, -1)


class ClickDataset(torch.utils.data.Dataset):
    """Samples of one click + K negatives of its impression, for listwise and pointwise training
    (pointwise: `require_negative=False`); works with any index sampler.

    `set_epoch(e)` redraws the negatives from (seed, e), so every process of a distributed run
    holds the same table and a resumed run draws the same negatives as an uninterrupted one.
    `__getitems__` builds a whole batch with array operations (used by DataLoader).
    `signals` (C, F), aligned with the candidates, adds each candidate's signals to the batches.
    """

    def __init__(
        self,
        behaviors: BehaviorArrays,
        negatives: int = 4,
        history_len: int = 50,
        seed: int = 0,
        require_negative: bool = True,
        signals: np.ndarray | None = None,
    ) -> None:
        if negatives < 1 or history_len < 1:
            raise ValueError("negatives and history_len must be >= 1")
        if signals is not None and len(signals) != len(behaviors.candidate_items):
            raise ValueError("signals must have one row per candidate")
        self.behaviors = behaviors
        self.signals = signals
        self.negatives = negatives
        self.history_len = history_len
        self.seed = seed
        self._build(require_negative)
        self.epoch = -1
        self.set_epoch(0)

    def _build(self, require_negative: bool) -> None:
        b = self.behaviors
        labels = np.asarray(b.candidate_labels)
        if labels.size and (labels < 0).all():
            raise ValueError("behaviors are unlabelled (labels -1): cannot train on them")
        imp = segment_ids(b.candidate_offsets)  # (C,) int32
        num = len(b.candidate_offsets) - 1
        pos, neg = labels == 1, labels == 0
        n_pos = np.bincount(imp[pos], minlength=num)
        n_neg = np.diff(b.candidate_offsets) - np.bincount(imp[~neg], minlength=num)
        keep = (n_pos > 0) & ((n_neg > 0) | (not require_negative))
        take = pos & keep[imp]
        del imp
        at = np.flatnonzero(take)  # (S,) flat candidate position of each sample's click
        self.positive = at  # (S,)
        self.impression = (np.searchsorted(b.candidate_offsets, at, side="right") - 1).astype(
            np.int32
        )  # (S,)
        self.neg_positions = np.flatnonzero(neg)  # (negatives,) grouped by impression
        self.neg_offsets = csr_offsets(n_neg)  # (I+1,)
        self.skipped_impressions = int(((n_pos > 0) & ~keep).sum() + (n_pos == 0).sum())
        logger.info(
            "%d samples from %d impressions (%d skipped: no click%s)",
            len(self.impression),
            int(keep.sum()),
            self.skipped_impressions,
            " or no negative" if require_negative else "",
        )

    def set_epoch(self, epoch: int) -> None:
        """Draw the negatives of `epoch` (a no-op when already drawn)."""
        if epoch == self.epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        base = self.neg_offsets[self.impression]
        count = self.neg_offsets[self.impression + 1] - base
        slots = sample_negatives(base, count, self.negatives, rng)  # (S, K)
        self.negative = np.where(slots >= 0, self.neg_positions[np.clip(slots, 0, None)], -1)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.impression)

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        b = self.behaviors
        history = gather_history(
            b.history_offsets, b.history_items, self.impression[idx], self.history_len
        )
        pos = np.concatenate([self.positive[idx, None], self.negative[idx]], axis=1)  # (B, 1+K)
        items = np.asarray(b.candidate_items)
        candidates = np.where(pos >= 0, items[np.clip(pos, 0, None)], 0).astype(np.int64)
        labels = np.zeros(candidates.shape, dtype=np.float32)
        labels[:, 0] = 1.0
        return Batch(
            torch.from_numpy(history),
            torch.from_numpy(candidates),
            torch.from_numpy(labels),
            gather_signals(self.signals, pos),
        )


def collate(batch: Batch | list[Batch]) -> Batch:
    """DataLoader collate: pass a `__getitems__` batch through, or concatenate single items."""
    if isinstance(batch, Batch):
        return batch
    signals = [b.signals for b in batch if b.signals is not None]
    return Batch(
        torch.cat([b.history for b in batch]),
        torch.cat([b.candidates for b in batch]),
        torch.cat([b.labels for b in batch]),
        torch.cat(signals) if signals else None,
    )


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch part-way, after `start` of its own indices."""

    def __init__(self, dataset: torch.utils.data.Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` indices of the next iteration (once)."""
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


@dataclass
class EvalRows:
    """Each impression's candidates cut into rows of at most `width` (vectorised CSR chunks)."""

    impression: np.ndarray  # (R,) impression of each row
    start: np.ndarray  # (R,) first flat candidate position of each row
    length: np.ndarray  # (R,) number of real candidates in the row
    width: int

    @classmethod
    def build(cls, candidate_offsets: np.ndarray, width: int) -> EvalRows:
        """Rows for every impression in order; an impression with no candidate gets none."""
        counts = np.diff(candidate_offsets)
        nrows = -(-counts // width)
        impression = segment_ids(csr_offsets(nrows))
        first_row = np.cumsum(nrows) - nrows
        chunk = np.arange(len(impression)) - np.repeat(first_row, nrows)
        start = candidate_offsets[impression] + chunk * width
        length = np.minimum(width, candidate_offsets[impression + 1] - start)
        return cls(impression, start, length, width)

    def __len__(self) -> int:
        return len(self.impression)


def iter_eval_batches(
    behaviors: BehaviorArrays,
    history_len: int,
    batch_candidates: int = 2048,
    width: int = 32,
    num_impressions: int | None = None,
    first_impression: int = 0,
    signals: np.ndarray | None = None,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Batches covering every candidate of impressions `first_impression` .. `num_impressions`
    - 1 (default: all) in flat order, with the (B, C) mask of real candidates; with the
    candidates' rows of `signals` (C, F) when given.

    Concatenating `scores[mask]` over the batches gives scores aligned with `candidate_items`
    (from the first impression's first candidate on).
    """
    offsets = np.asarray(behaviors.candidate_offsets)
    stop = len(offsets) - 1 if num_impressions is None else num_impressions
    items = np.asarray(behaviors.candidate_items)
    labels = np.asarray(behaviors.candidate_labels)
    rows = EvalRows.build(offsets[first_impression : stop + 1], width)
    rows.impression += first_impression
    per_batch = max(1, batch_candidates // width)
    col = np.arange(width)[None, :]
    for lo in range(0, len(rows), per_batch):
        sl = slice(lo, lo + per_batch)
        mask = col < rows.length[sl, None]  # (R, W)
        pos = np.where(mask, rows.start[sl, None] + col, -1)
        history = gather_history(
            behaviors.history_offsets, behaviors.history_items, rows.impression[sl], history_len
        )
        at = np.clip(pos, 0, None)
        candidates = np.where(mask, items[at], 0).astype(np.int64)
        row_labels = np.where(mask, labels[at], 0).astype(np.float32)
        batch = Batch(
            torch.from_numpy(history),
            torch.from_numpy(candidates),
            torch.from_numpy(row_labels),
            gather_signals(signals, pos),
        )
        yield batch, torch.from_numpy(mask)
