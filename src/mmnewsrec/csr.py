"""Ragged rows in CSR form: row r owns `items[offsets[r]:offsets[r + 1]]`.

numpy helpers for the data side; torch helpers (torch imported on use) for recall and ranking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


def csr_offsets(counts: np.ndarray) -> np.ndarray:
    """(len(counts)+1,) int64 offsets from per-row counts."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """Row id of every element of a CSR array (int32 when the row count fits)."""
    rows = len(offsets) - 1
    dtype = np.int32 if rows < 2**31 else np.int64
    return np.repeat(np.arange(rows, dtype=dtype), np.diff(offsets))


def pad_rows(
    values: np.ndarray, offsets: np.ndarray, fill: float
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Ragged rows (CSR) as a dense (rows, longest) matrix, and the (row, col) of each value."""
    sizes = np.diff(offsets)
    row = segment_ids(offsets)
    col = np.arange(len(values)) - (offsets[:-1] - offsets[0])[row]
    dense = np.full((len(sizes), sizes.max()), fill)
    dense[row, col] = values
    return dense, (row, col)


def isin_small(elements: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """np.isin(elements, pool) by a binary search in the sorted pool: several times faster than
    np.isin on the few hundred news of one request."""
    if len(pool) == 0:
        return np.zeros(len(elements), dtype=bool)
    pool = np.sort(pool)
    return pool[np.searchsorted(pool, elements).clip(max=len(pool) - 1)] == elements


def tensor_segment_ids(offsets: Tensor) -> Tensor:
    """Row id of every element of a CSR array (torch, on the offsets' device)."""
    import torch

    # a binary search: about 3x faster than repeat_interleave on the few rows of a request
    starts = torch.arange(int(offsets[0]), int(offsets[-1]), device=offsets.device)
    return torch.searchsorted(offsets[1:], starts, right=True)


def isin_sorted(elements: Tensor, pool: Tensor) -> Tensor:
    """torch.isin(elements, pool) by a binary search in the sorted pool: one sort of the pool
    instead of one of both (faster when the pool is the smaller, as exclusions are)."""
    import torch

    if len(pool) == 0:
        return torch.zeros_like(elements, dtype=torch.bool)
    pool = pool.sort().values
    at = torch.searchsorted(pool, elements).clamp_max(len(pool) - 1)
    return pool[at] == elements


def padded_to_csr(padded: Tensor) -> tuple[Tensor, Tensor]:
    """(U, L) news indices, 0 = padding -> CSR (offsets (U+1,), items (nnz,)), order kept."""
    import torch

    mask = padded > 0
    offsets = torch.zeros(len(padded) + 1, dtype=torch.int64, device=padded.device)
    offsets[1:] = mask.sum(1).cumsum(0)
    return offsets, padded[mask].long()


def slice_csr(offsets: Tensor, items: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Rows start:stop of a CSR pair, offsets rebased to 0."""
    lo, hi = int(offsets[start]), int(offsets[stop])
    return offsets[start : stop + 1] - lo, items[lo:hi]


def pair_keys(offsets: Tensor, items: Tensor, width: int) -> Tensor:
    """One int64 key per (row, item) of a CSR pair: row * width + item."""
    return tensor_segment_ids(offsets) * width + items


def mean_user_vectors(
    clicked: Tensor, offsets: Tensor, recency_weighting: float | None = None
) -> Tensor:
    """L2-normalised (optionally recency-weighted) mean of clicked-news vectors: (U, D).

    clicked: (nnz, D) unit vectors of the clicks, user u owning rows offsets[u]:offsets[u+1],
    oldest first. With recency_weighting = g in (0, 1], the r-th most recent click (r = 0 the
    latest) weighs g**r. A user without clicks gets a zero vector.
    """
    import torch
    import torch.nn.functional as F

    device, users = clicked.device, len(offsets) - 1
    rows = tensor_segment_ids(offsets)  # (nnz,)
    weights = torch.ones(len(rows), dtype=clicked.dtype, device=device)
    if recency_weighting is not None:
        recency = offsets[rows + 1] - 1 - torch.arange(len(rows), device=device)
        weights = float(recency_weighting) ** recency.to(clicked.dtype)
    summed = torch.zeros(users, clicked.shape[1], dtype=clicked.dtype, device=device)
    summed.index_add_(0, rows, clicked * weights[:, None])
    return F.normalize(summed, dim=1)
