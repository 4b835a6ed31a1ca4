"""Recall: a user vector from clicked news, then cosine top-K over the whole corpus."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmnewsrec.csr import (
    mean_user_vectors,
    padded_to_csr,
    pair_keys,
    slice_csr,
    tensor_segment_ids,
)
from mmnewsrec.files import atomic_file

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "exact", "faiss_flat", "faiss_hnsw")
SCORE_BLOCK = 1 << 25  # floats in one (users x news) block of exact scores
TRAIN_SAMPLE = 100_000  # news that set the 8-bit code ranges of the HNSW index
ADD_BLOCK = 65_536  # news normalised and added to a FAISS index at a time


def as_csr(histories: Any) -> tuple[Tensor, Tensor]:
    """Accept a padded 2-D array/list/tensor or an (offsets, items) tuple; return int64 CSR."""
    if isinstance(histories, tuple):
        offsets, items = histories
        return int64_tensor(offsets), int64_tensor(items)
    padded = torch.as_tensor(np.asarray(histories))
    if padded.ndim != 2:
        raise ValueError(f"histories: expected (users, L) or (offsets, items), got {padded.shape}")
    return padded_to_csr(padded)


def int64_tensor(values: Any) -> Tensor:
    """An int64 tensor over `values`, sharing its memory where it can; a read-only array (a
    memory-mapped store) is copied, since torch tensors need writable memory."""
    array = np.asarray(values, dtype=np.int64)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class Recaller:
    """Cosine top-K recall over all news from the mean vector of a user's clicks.

    backend: "exact" (torch matmul over the whole corpus), "faiss_hnsw" (an HNSW graph over
    8-bit codes, approximate, with the found news rescored exactly), "faiss_flat" (exact,
    IndexFlatIP, which keeps a float32 copy of its own) or "auto" (exact up to
    `exact_max_news` news, else faiss_hnsw). Row 0 of the news vectors is padding and is never
    returned; index 0 in a result means "no result" (fewer than k news left after exclusion).

    The news matrix is held once: a float32 array given to `fit` is used as it is (not copied),
    with one inverse norm per row, so a server can share it with the reranker.
    """

    def __init__(
        self,
        k: int = 100,
        backend: str = "auto",  # one of BACKENDS
        recency_weighting: float | None = None,
        exact_max_news: int = 100_000,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 128,
        batch_size: int = 1024,
    ) -> None:
        self.k = k
        self.backend = backend
        self.recency_weighting = recency_weighting
        self.exact_max_news = exact_max_news
        self.hnsw_m = hnsw_m
        self.hnsw_ef_search = hnsw_ef_search
        self.batch_size = batch_size

    def fit(self, vectors: Any, cache_dir: Path | None = None, cache_key: str = "") -> Recaller:
        """Take the news vectors (N+1, D) (row 0 = padding): a float32 tensor or writable array
        is kept as it is, anything else converted once; then build the index.

        cache_dir, cache_key: an HNSW index (slow to build at scale) is saved under `cache_dir`,
        named by its parameters and `cache_key` (the vectors' content hash), and read back by
        the next fit with the same key instead of being built again.
        """
        self._check_params()
        if isinstance(vectors, Tensor):
            matrix = vectors.float()
        else:
            array = np.asarray(vectors, dtype=np.float32)
            matrix = torch.from_numpy(array if array.flags.writeable else array.copy())
        if matrix.ndim != 2 or len(matrix) < 2:
            raise ValueError(f"vectors: expected (N+1, D) with N >= 1, got {tuple(matrix.shape)}")
        self.vectors_ = matrix
        self.inv_norms_ = 1.0 / torch.linalg.vector_norm(matrix, dim=1).clamp_min(1e-12)
        self.inv_norms_[0] = 0.0  # padding scores 0 and is masked
        self.num_news_ = len(matrix) - 1
        self.backend_ = self._resolve_backend()
        self.index_ = None
        if self.backend_ == "faiss_hnsw" and cache_dir is not None and cache_key:
            self.index_ = self._cached_index(cache_dir / f"hnsw{self.hnsw_m}-sq8-{cache_key}.faiss")
        elif self.backend_ != "exact":
            self.index_ = self._build_index()
        logger.info("recaller: %d news, dim %d, %s", self.num_news_, matrix.shape[1], self.backend_)
        return self

    def user_vectors(self, histories: Any) -> np.ndarray:
        """Unit user vectors (U, D) from histories: padded (U, L) or (offsets, items)."""
        offsets, items = as_csr(histories)
        chunks = [
            self._users(*slice_csr(offsets, items, s, min(s + self.batch_size, len(offsets) - 1)))
            for s in range(0, len(offsets) - 1, self.batch_size)
        ]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, self.vectors_.shape[1]))

    def search(
        self, user_vectors: Any, k: int | None = None, exclude: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine (scores (U, k) float32, news indices (U, k) int64), best first.

        exclude: news to leave out per user (e.g. the history), padded (U, E) or (offsets, items).
        """
        users = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32))
        if exclude is None:
            exclude = (torch.zeros(len(users) + 1, dtype=torch.int64), torch.zeros(0).long())
        ex_offsets, ex_items = as_csr(exclude)
        if len(ex_offsets) - 1 != len(users):
            raise ValueError(f"exclude has {len(ex_offsets) - 1} rows for {len(users)} users")
        results = [
            self._search(
                users[s : s + self.batch_size],
                k or self.k,
                *slice_csr(ex_offsets, ex_items, s, min(s + self.batch_size, len(users))),
            )
            for s in range(0, len(users), self.batch_size)
        ]
        scores, indices = zip(*results, strict=True) if results else ((), ())
        width = min(k or self.k, self.num_news_)
        return (
            torch.cat(scores).numpy() if scores else np.zeros((0, width), np.float32),
            torch.cat(indices).numpy() if indices else np.zeros((0, width), np.int64),
        )

    def recall_at_k(
        self, behaviors: Any, k: int | None = None, exclude_history: bool = True
    ) -> float:
        """Share of clicked candidates found in each impression's top-k over the whole corpus.

        behaviors: a labelled `Behaviors` (history/candidate CSR arrays and labels).
        """
        if not behaviors.labelled:
            raise ValueError(f"split {behaviors.split!r} is unlabelled: recall@k needs clicks")
        h_offsets, h_items = as_csr((behaviors.history_offsets, behaviors.history_items))
        c_offsets, c_items = as_csr((behaviors.candidate_offsets, behaviors.candidate_items))
        hits = clicks = 0
        for s in range(0, len(h_offsets) - 1, self.batch_size):
            stop = min(s + self.batch_size, len(h_offsets) - 1)
            history = slice_csr(h_offsets, h_items, s, stop)
            exclude = history if exclude_history else (history[0] * 0, history[1][:0])
            _, top = self._search(self._users(*history), k or self.k, *exclude)
            c_off, c_it = slice_csr(c_offsets, c_items, s, stop)
            labels = behaviors.candidate_labels[int(c_offsets[s]) : int(c_offsets[stop])]
            clicked = torch.from_numpy(np.asarray(labels) == 1)  # a new, writable array
            keys = pair_keys(c_off, c_it, self.num_news_ + 1)[clicked]
            top_keys = torch.arange(len(top))[:, None] * (self.num_news_ + 1) + top
            hits += int(torch.isin(keys, top_keys[top > 0]).sum())
            clicks += len(keys)
        logger.info("recall@%d: %d of %d clicks", k or self.k, hits, clicks)
        return hits / clicks if clicks else float("nan")

    def _check_params(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        g = self.recency_weighting
        if g is not None and not 0.0 < g <= 1.0:
            raise ValueError(f"recency_weighting must be in (0, 1], got {g}")

    def _resolve_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "exact" if self.num_news_ <= self.exact_max_news else "faiss_hnsw"

    def _cached_index(self, path: Path) -> Any:
        import faiss

        if path.is_file():
            index = faiss.read_index(str(path))
            if (index.ntotal, index.d) == (self.num_news_, self.vectors_.shape[1]):
                logger.info("recall index read from %s", path)
                return index
            logger.warning("%s holds another corpus: building the index again", path)
        index = self._build_index()
        try:
            with atomic_file(path) as tmp:
                faiss.write_index(index, str(tmp))
        except OSError as err:
            logger.warning("recall index not saved (%s); the next start builds it again", err)
        return index

    def _build_index(self) -> Any:
        """The FAISS index over the unit news vectors, added in blocks (bounded extra memory)."""
        import faiss

        dim = self.vectors_.shape[1]
        index: Any
        if self.backend_ == "faiss_flat":
            index = faiss.IndexFlatIP(dim)
        else:
            quantizer: Any = faiss.ScalarQuantizer.QT_8bit  # a quarter of a float32 copy
            index = faiss.IndexHNSWSQ(dim, quantizer, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            sample = torch.randperm(self.num_news_, generator=torch.Generator().manual_seed(0))
            index.train(self._unit_rows(1 + sample[:TRAIN_SAMPLE]))
        for s in range(1, self.num_news_ + 1, ADD_BLOCK):
            index.add(self._unit_rows(torch.arange(s, min(s + ADD_BLOCK, self.num_news_ + 1))))
        return index

    def _unit_rows(self, rows: Tensor) -> np.ndarray:
        return np.ascontiguousarray((self.vectors_[rows] * self.inv_norms_[rows, None]).numpy())

    def _users(self, offsets: Tensor, items: Tensor) -> Tensor:
        unit = self.vectors_[items] * self.inv_norms_[items, None]
        return mean_user_vectors(unit, offsets, self.recency_weighting)

    def _search(
        self, users: Tensor, k: int, ex_offsets: Tensor, ex_items: Tensor
    ) -> tuple[Tensor, Tensor]:
        k = min(k, self.num_news_)
        if self.index_ is None:
            return self._search_exact(users, k, ex_offsets, ex_items)
        return self._search_faiss(users, k, ex_offsets, ex_items)

    def _search_exact(
        self, users: Tensor, k: int, ex_offsets: Tensor, ex_items: Tensor
    ) -> tuple[Tensor, Tensor]:
        step = max(1, SCORE_BLOCK // (self.num_news_ + 1))
        rows = tensor_segment_ids(ex_offsets)
        out = []
        for s in range(0, len(users), step):
            scores = (users[s : s + step] @ self.vectors_.T) * self.inv_norms_  # (b, N+1)
            scores[:, 0] = -torch.inf
            part = (rows >= s) & (rows < s + step)
            scores[rows[part] - s, ex_items[part]] = -torch.inf
            out.append(scores.topk(k, dim=1))
        top = torch.cat([t.values for t in out]), torch.cat([t.indices for t in out])
        return top[0], top[1].masked_fill(top[0] == -torch.inf, 0)

    def _search_faiss(
        self, users: Tensor, k: int, ex_offsets: Tensor, ex_items: Tensor
    ) -> tuple[Tensor, Tensor]:
        """FAISS candidates (enough to survive the exclusions), rescored exactly on the news
        matrix, excluded ones dropped, best k kept."""
        extra = int(ex_offsets.diff().max()) if len(ex_items) else 0
        fetch = min(k + extra, self.num_news_)
        index = self.index_
        assert index is not None
        query = np.ascontiguousarray(users.numpy())
        if self.backend_ == "faiss_hnsw":
            import faiss

            # per-call parameters: concurrent searches never share a mutated efSearch
            ef_search = max(self.hnsw_ef_search, fetch)
            params = faiss.SearchParametersHNSW(efSearch=ef_search)  # type: ignore[attr-defined]
            _, found = index.search(query, fetch, params=params)
        else:
            _, found = index.search(query, fetch)
        ids = torch.from_numpy(found).long() + 1  # FAISS -1 (none) -> 0
        scores = torch.einsum("ud,ufd->uf", users, self.vectors_[ids]) * self.inv_norms_[ids]
        width = self.num_news_ + 1
        keys = torch.arange(len(ids))[:, None] * width + ids
        keep = (ids > 0) & ~torch.isin(keys, pair_keys(ex_offsets, ex_items, width))
        scores = scores.masked_fill(~keep, -torch.inf)
        top, order = scores.topk(k, dim=1)
        return top, ids.gather(1, order).masked_fill(top == -torch.inf, 0)
