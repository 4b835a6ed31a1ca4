"""Recall: a user vector from clicked news, then top-K over the whole corpus in the recall space
(parts centred and unit-scaled), optionally merged with a popularity/freshness channel."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmnewsrec.csr import (
    isin_small,
    isin_sorted,
    mean_user_vectors,
    padded_to_csr,
    pair_keys,
    slice_csr,
    tensor_segment_ids,
)
from mmnewsrec.files import atomic_file
from mmnewsrec.formats.store import NEVER
from mmnewsrec.growing import GrowingRows, SharedLock, append_rows
from mmnewsrec.recall.channels import ItemStats, store_item_stats
from mmnewsrec.recall.space import Part, RecallSpace, vector_parts

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "exact", "faiss_flat", "faiss_hnsw")
# Share of K given to the popularity/freshness channel by evaluation and serving: the best
# recall@200 of 0, 0.1, 0.25, 0.5 on the demo data (0.1 costs <= 0.002 at K = 10 and 50).
DEFAULT_POPULAR_SHARE = 0.1
# Beyond this many news, "auto" searches an HNSW graph, in serving and evaluation alike (a
# report measures the recall that is served): an exact scan of 100k x 384 float32 reads 150 MB
# per request (about 15 ms on one core), over a 10 ms latency budget.
EXACT_MAX_NEWS = 20_000
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
    """Top-K recall over all news from the mean vector of a user's clicks.

    Scores are inner products in a `RecallSpace`: with centre_parts (default) each part of the
    news vectors (text, image) is centred and unit-scaled, the image part weighted by
    `image_weight`; without it, the plain cosine over whole rows. popular_share: the share of
    k given to the popularity/freshness channel (`channels.ItemStats`), which fills it with its
    best items not already in the content channel's top k - quota; 0 turns it off.

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
        exact_max_news: int = EXACT_MAX_NEWS,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 128,
        batch_size: int = 1024,
        centre_parts: bool = True,
        image_weight: float = 0.5,  # best recall@200 of 0.25, 0.5, 0.7, 1 (demo data)
        popular_share: float = 0.0,
        half_life_days: float = 1.0,
    ) -> None:
        self.k = k
        self.backend = backend
        self.recency_weighting = recency_weighting
        self.exact_max_news = exact_max_news
        self.hnsw_m = hnsw_m
        self.hnsw_ef_search = hnsw_ef_search
        self.batch_size = batch_size
        self.centre_parts = centre_parts
        self.image_weight = image_weight
        self.popular_share = popular_share
        self.half_life_days = half_life_days

    def fit_store(
        self,
        news_vectors: Any,
        store: Any,
        click_split: str,
        matrix: Any = None,
        cache_dir: Path | None = None,
    ) -> Recaller:
        """Fit on `NewsVectors` (parts from its manifest; `matrix`, the same rows as float32,
        used instead of its array when given) and, when the channel is on, the item
        statistics of a `Store`'s logs with popularity from `click_split`. Evaluation and
        serving both fit this way, so both recall alike."""
        stats = None
        if self.popular_share > 0:
            stats = store_item_stats(store, click_split, self.half_life_days)
        parts = vector_parts(news_vectors.manifest, news_vectors.dim)
        vectors = news_vectors.vectors if matrix is None else matrix
        return self.fit(vectors, cache_dir, news_vectors.hash[:16], parts, stats)

    def fit(
        self,
        vectors: Any,
        cache_dir: Path | None = None,
        cache_key: str = "",
        parts: tuple[Part, ...] | None = None,
        stats: ItemStats | None = None,
    ) -> Recaller:
        """Take the news vectors (N+1, D) (row 0 = padding): a float32 tensor or writable array
        is kept as it is, anything else converted once; then build the index.

        cache_dir, cache_key: an HNSW index (slow to build at scale) is saved under `cache_dir`,
        named by its parameters and `cache_key` (the vectors' content hash), and read back by
        the next fit with the same key instead of being built again.
        parts: the column parts of the vectors (default one over all columns); stats: the item
        statistics of the popularity/freshness channel, needed when popular_share > 0.
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
        self.space_ = self._space(parts).fit(matrix)
        self.num_news_ = len(matrix) - 1
        self._fit_channel(stats)
        self.backend_ = self._resolve_backend()
        self.grown_: dict[str, GrowingRows] = {}  # per-news tables as they grow (`appended`)
        self.index_lock_ = SharedLock()  # searches, or one `add` (`appended`)
        self.owns_index_ = False  # whether `appended` may add to index_ (not the fitted one's)
        self.index_ = None
        if self.backend_ == "faiss_hnsw" and cache_dir is not None and cache_key:
            name = f"hnsw{self.hnsw_m}-sq8-{self.space_.key}-{cache_key}.faiss"
            self.index_ = self._cached_index(cache_dir / name)
        elif self.backend_ != "exact":
            self.index_ = self._build_index()
        logger.info("recaller: %d news, dim %d, %s", self.num_news_, matrix.shape[1], self.backend_)
        return self

    def _space(self, parts: tuple[Part, ...] | None) -> RecallSpace:
        whole = (Part("all", 0, self.vectors_.shape[1]),)
        if not self.centre_parts:
            return RecallSpace(whole, centre=False)
        return RecallSpace(parts or whole, weights={"image": self.image_weight})

    def _fit_channel(self, stats: ItemStats | None) -> None:
        """The channel's static order (`channel_order_`: the news it can offer, best first;
        `channel_`: minus each news item's place in it, -inf if absent, so no two tie) and the
        first-seen times, when it is on."""
        self.channel_: Tensor | None = None
        if self.popular_share == 0:
            return
        if stats is None:
            raise ValueError("popular_share > 0 needs item statistics (fit(..., stats=...))")
        if len(stats.first_seen) != self.num_news_ + 1:
            raise ValueError(
                f"item statistics cover {len(stats.first_seen) - 1} news, vectors {self.num_news_}"
            )
        scores = stats.channel_scores()
        order = np.argsort(-scores, kind="stable")[: int(np.isfinite(scores).sum())]
        place = np.full(len(scores), -np.inf, dtype=np.float32)
        place[order] = -np.arange(len(order), dtype=np.float32)
        self.channel_, self.channel_order_ = torch.from_numpy(place), torch.from_numpy(order)
        self.first_seen_ = torch.from_numpy(stats.first_seen)

    def appended(self, rows: Tensor) -> Recaller:
        """A copy of this fitted recaller that also holds n new news `rows` (n, D) float32 after
        its own: scaled by the fitted space and, having no clicks yet, never offered by the
        popularity channel.

        Only the new rows are written (amortised O(n), `mmnewsrec.growing`): the copy's news
        matrix and per-news tables are longer views of growing tables that this recaller's
        views are the start of, and a FAISS index takes the rows itself (`add`, while no
        search runs; the fitted index is copied once, on the first addition). This recaller
        goes on searching its own news as before (index entries past them are dropped), so
        requests still running on it are not disturbed. Adding to a copy that is not the
        latest copies its tables first (O(N)).
        """
        start = len(self.vectors_)
        if rows.ndim != 2 or rows.shape[1] != self.vectors_.shape[1]:
            raise ValueError(f"expected rows of width {self.vectors_.shape[1]}, got {rows.shape}")
        index = self.index_
        if index is not None and index.ntotal > self.num_news_ and self.backend_ != "faiss_flat":
            raise ValueError(
                "news were added to a later copy of this recaller, and its HNSW index cannot "
                "drop them: add to the latest copy"
            )
        new = copy.copy(self)
        new.grown_ = grown = dict(self.grown_)  # its own: one grown from this later starts anew
        new.vectors_ = append_rows(grown, "vectors", self.vectors_, rows.float())
        new.num_news_ = len(new.vectors_) - 1
        new.space_ = self.space_.appended(rows)
        if self.channel_ is not None:
            n = len(rows)
            absent = self.channel_.new_full((n,), -torch.inf)
            new.channel_ = append_rows(grown, "channel", self.channel_, absent)
            never = self.first_seen_.new_full((n,), NEVER)  # absent from the logs
            new.first_seen_ = append_rows(grown, "first_seen", self.first_seen_, never)
        if index is not None:
            lock = self.index_lock_
            if not self.owns_index_ or index.ntotal != self.num_news_:
                index, lock = self._index_copy(), SharedLock()
            unit = new._unit_rows(torch.arange(start, start + len(rows)))
            with lock.exclusive():
                index.add(unit)
            new.index_, new.index_lock_, new.owns_index_ = index, lock, True
        return new

    def _index_copy(self) -> Any:
        """A copy of the FAISS index holding this recaller's news only, for the first copy
        that takes news (the fitted index stays as it is) and for one made from an older copy,
        whose index a later copy took news into (a flat index drops them)."""
        import faiss

        assert self.index_ is not None
        with self.index_lock_.shared():
            index = faiss.clone_index(self.index_)
        if index.ntotal > self.num_news_:
            index.remove_ids(faiss.IDSelectorRange(self.num_news_, index.ntotal))
        return index

    def user_vectors(self, histories: Any) -> np.ndarray:
        """Unit user vectors (U, D) from histories: padded (U, L) or (offsets, items)."""
        offsets, items = as_csr(histories)
        chunks = [
            self._users(*slice_csr(offsets, items, s, min(s + self.batch_size, len(offsets) - 1)))
            for s in range(0, len(offsets) - 1, self.batch_size)
        ]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, self.vectors_.shape[1]))

    def search(
        self, user_vectors: Any, k: int | None = None, exclude: Any = None, times: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (content scores (U, k) float32, news indices (U, k) int64) in recall order:
        the content channel's best first, then the popularity channel's share, if any.

        exclude: news to leave out per user (e.g. the history), padded (U, E) or (offsets, items).
        times: (U,) unix seconds of the requests; the popularity channel then offers only news
        first seen before them (default: every news in the logs).
        """
        users = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32))
        when = None if times is None else int64_tensor(times)
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
                None if when is None else when[s : s + self.batch_size],
            )
            for s in range(0, len(users), self.batch_size)
        ]
        scores, indices = zip(*results, strict=True) if results else ((), ())
        width = min(k or self.k, self.num_news_)
        return (
            torch.cat(scores).numpy() if scores else np.zeros((0, width), np.float32),
            torch.cat(indices).numpy() if indices else np.zeros((0, width), np.int64),
        )

    def search_one(
        self, history: np.ndarray, k: int | None = None, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One user's recall, as `search` of the user vector of `history` excluding `exclude`
        (same news, same order, scores within float32 rounding) without the batching glue:
        a serving request's path. history: the clicks (int64 news indices, oldest first);
        exclude: sorted unique news indices to leave out. Returns (k,) scores and indices."""
        items = torch.from_numpy(np.asarray(history, dtype=np.int64))
        user = self._users(torch.tensor([0, len(items)]), items)  # (1, D)
        excluded = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        k = min(k or self.k, self.num_news_)
        if self.index_ is None:
            ex = torch.from_numpy(excluded)
            top, found = self._search_exact(user, k, torch.tensor([0, len(ex)]), ex)
            scores, ids = top[0].numpy(), found[0].numpy()
        else:
            scores, ids = self._search_faiss_one(user, k, excluded)
        quota = min(k, round(self.popular_share * k)) if self.channel_ is not None else 0
        if quota == 0:
            return scores, ids
        return self._merge_one(user, scores, ids, quota, excluded)

    def _search_faiss_one(
        self, user: Tensor, k: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`_search_faiss` for one user (1, D): (k,) scores and news indices."""
        fetch = min(k + len(excluded), self.num_news_)
        found = self._faiss_ids(user.numpy(), fetch)[0] + 1  # FAISS -1 (none) -> 0
        found[isin_small(found, excluded)] = 0
        scores = self._rescore_one(user, found)
        order = np.argsort(-scores, kind="stable")[:k]
        top, ids = scores[order], found[order]
        ids[top == -np.inf] = 0
        return top, ids

    def _rescore_one(self, user: Tensor, ids: np.ndarray) -> np.ndarray:
        """`_rescore` for one user (1, D) and news `ids` (n,): (n,) scores, -inf for id 0."""
        scores = self.space_.score_one(user[0].numpy(), self.vectors_.numpy(), ids)
        return np.where(ids == 0, -np.inf, scores).astype(np.float32)

    def _merge_one(
        self, user: Tensor, scores: np.ndarray, ids: np.ndarray, quota: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`_merge` for one user without times: the channel's best `quota` news not in the
        content head nor excluded take the last places; the tail keeps what they do not
        repeat; places left empty go last."""
        head = len(ids) - quota
        pool = self.channel_order_.numpy()[: quota + head + len(excluded)]
        popular = pool[~isin_small(pool, np.concatenate([ids[:head], excluded]))][:quota]
        tail = np.where(isin_small(ids[head:], popular), 0, ids[head:])
        merged = np.concatenate([ids[:head], popular, tail])
        popular_scores = self._rescore_one(user, popular)
        merged_scores = np.concatenate([scores[:head], popular_scores, scores[head:]])
        merged_scores[merged == 0] = -np.inf
        order = np.argsort(merged == 0, kind="stable")[: len(ids)]
        return merged_scores[order], merged[order]

    def recall_at_k(
        self, behaviors: Any, k: int | None = None, exclude_history: bool = True
    ) -> float:
        """Share of clicked candidates found in each impression's top-k over the whole corpus.

        behaviors: a labelled `Behaviors` (history/candidate CSR arrays, labels and times).
        """
        k = k or self.k
        return self.recall_stats(behaviors, [k], exclude_history=exclude_history)[k]["recall"]

    def recall_stats(
        self,
        behaviors: Any,
        ks: list[int],
        has_image: Any = None,
        exclude_history: bool = True,
    ) -> dict[int, dict[str, float]]:
        """Per k: "recall" (as `recall_at_k`) and, given has_image (N+1,) bool, "image_share":
        the share of news with an image among all recalled news."""
        if not behaviors.labelled:
            raise ValueError(f"split {behaviors.split!r} is unlabelled: recall@k needs clicks")
        image = None if has_image is None else torch.from_numpy(np.array(has_image, dtype=bool))
        stats = {}
        for k in ks:
            hits = clicks = recalled = with_image = 0
            for top, clicked_keys in self._impression_tops(behaviors, k, exclude_history):
                top_keys = torch.arange(len(top))[:, None] * (self.num_news_ + 1) + top
                hits += int(torch.isin(clicked_keys, top_keys[top > 0]).sum())
                clicks += len(clicked_keys)
                recalled += int((top > 0).sum())
                with_image += 0 if image is None else int(image[top[top > 0]].sum())
            logger.info("recall@%d: %d of %d clicks", k, hits, clicks)
            stats[k] = {"recall": hits / clicks if clicks else float("nan")}
            if image is not None:
                stats[k]["image_share"] = with_image / recalled if recalled else float("nan")
        return stats

    def _impression_tops(
        self, behaviors: Any, k: int, exclude_history: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Per batch of impressions: the top-k news (b, k) and the clicked (row, news) keys."""
        h_offsets, h_items = as_csr((behaviors.history_offsets, behaviors.history_items))
        c_offsets, c_items = as_csr((behaviors.candidate_offsets, behaviors.candidate_items))
        times = int64_tensor(behaviors.times)
        for s in range(0, len(h_offsets) - 1, self.batch_size):
            stop = min(s + self.batch_size, len(h_offsets) - 1)
            history = slice_csr(h_offsets, h_items, s, stop)
            exclude = history if exclude_history else (history[0] * 0, history[1][:0])
            _, top = self._search(self._users(*history), k, *exclude, times[s:stop])
            c_off, c_it = slice_csr(c_offsets, c_items, s, stop)
            labels = behaviors.candidate_labels[int(c_offsets[s]) : int(c_offsets[stop])]
            clicked = torch.from_numpy(np.asarray(labels) == 1)  # a new, writable array
            yield top, pair_keys(c_off, c_it, self.num_news_ + 1)[clicked]

    def _check_params(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        g = self.recency_weighting
        if g is not None and not 0.0 < g <= 1.0:
            raise ValueError(f"recency_weighting must be in (0, 1], got {g}")
        if not 0.0 <= self.popular_share <= 1.0:
            raise ValueError(f"popular_share must be in [0, 1], got {self.popular_share}")
        if self.image_weight < 0 or self.half_life_days <= 0:
            raise ValueError("image_weight must be >= 0 and half_life_days > 0")

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
        return np.ascontiguousarray(self.space_.rows(self.vectors_, rows).numpy())

    def _users(self, offsets: Tensor, items: Tensor) -> Tensor:
        clicked = self.space_.rows(self.vectors_, items)
        return mean_user_vectors(clicked, offsets, self.recency_weighting)

    def _search(
        self, users: Tensor, k: int, ex_offsets: Tensor, ex_items: Tensor, times: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        k = min(k, self.num_news_)
        if self.index_ is None:
            scores, ids = self._search_exact(users, k, ex_offsets, ex_items)
        else:
            scores, ids = self._search_faiss(users, k, ex_offsets, ex_items)
        quota = min(k, round(self.popular_share * k)) if self.channel_ is not None else 0
        if quota == 0:
            return scores, ids
        return self._merge(users, scores, ids, quota, ex_offsets, ex_items, times)

    def _search_exact(
        self, users: Tensor, k: int, ex_offsets: Tensor, ex_items: Tensor
    ) -> tuple[Tensor, Tensor]:
        step = max(1, SCORE_BLOCK // (self.num_news_ + 1))
        rows = tensor_segment_ids(ex_offsets)
        out = []
        for s in range(0, len(users), step):
            scores = self.space_.scores(users[s : s + step], self.vectors_)  # (b, N+1)
            out.append(mask_excluded(scores, s, rows, ex_items).topk(k, dim=1))
        top = torch.cat([t.values for t in out]), torch.cat([t.indices for t in out])
        return top[0], top[1].masked_fill(top[0] == -torch.inf, 0)

    def _search_faiss(
        self, users: Tensor, k: int, ex_offsets: Tensor, ex_items: Tensor
    ) -> tuple[Tensor, Tensor]:
        """FAISS candidates (enough to survive the exclusions), rescored exactly on the news
        matrix, excluded ones dropped, best k kept."""
        extra = int(ex_offsets.diff().max()) if len(ex_items) else 0
        fetch = min(k + extra, self.num_news_)
        ids = torch.from_numpy(self._faiss_ids(users.numpy(), fetch)) + 1  # FAISS -1 -> 0
        width = self.num_news_ + 1
        keys = torch.arange(len(ids))[:, None] * width + ids
        excluded = isin_sorted(keys, pair_keys(ex_offsets, ex_items, width))
        scores = self._rescore(users, ids.masked_fill(excluded, 0))
        top, order = scores.topk(k, dim=1)
        return top, ids.gather(1, order).masked_fill(top == -torch.inf, 0)

    def _faiss_ids(self, users: np.ndarray, fetch: int) -> np.ndarray:
        """The FAISS index's `fetch` nearest news per user (b, fetch), int64, -1 = none."""
        index = self.index_
        assert index is not None
        query = np.ascontiguousarray(users, dtype=np.float32)
        params = None
        if self.backend_ == "faiss_hnsw":
            import faiss

            # per-call parameters: concurrent searches never share a mutated efSearch
            ef_search = max(self.hnsw_ef_search, fetch)
            params = faiss.SearchParametersHNSW(efSearch=ef_search)  # type: ignore[attr-defined]
        with self.index_lock_.shared():  # no `add` meanwhile (`appended`)
            ids = index.search(query, fetch, params=params)[1].astype(np.int64, copy=False)
        ids[ids >= self.num_news_] = -1  # news added to a later copy (`appended`)
        return ids

    def _rescore(self, users: Tensor, ids: Tensor) -> Tensor:
        """Exact scores (b, n) of news `ids` (b, n); -inf where an id is 0 (none). The rows are
        gathered a block of users at a time: (b, n, D) at once would be gigabytes."""
        step = max(1, SCORE_BLOCK // max(1, ids.shape[1] * self.vectors_.shape[1]))
        blocks = [
            self.space_.score_rows(users[s : s + step], self.vectors_, block)
            for s, block in zip(range(0, len(ids), step), ids.split(step), strict=True)
        ]
        scores = torch.cat(blocks) if blocks else ids.new_zeros(ids.shape, dtype=torch.float32)
        return scores.masked_fill(ids == 0, -torch.inf)

    def _merge(
        self,
        users: Tensor,
        scores: Tensor,
        ids: Tensor,
        quota: int,
        ex_offsets: Tensor,
        ex_items: Tensor,
        times: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The content top k (b, k) with its last `quota` places given to the channel's best
        news not already above them; places the channel cannot fill go back to content.
        Only the channel's news are scored here: the content news keep their `scores`."""
        k = ids.shape[1]
        head, tail = ids[:, : k - quota], ids[:, k - quota :]
        popular = self._channel_top(quota, head, ex_offsets, ex_items, times)
        rows = torch.arange(len(ids))[:, None] * (self.num_news_ + 1)
        repeated = isin_sorted(rows + tail, (rows + popular)[popular > 0])
        merged = torch.cat([head, popular, tail.masked_fill(repeated, 0)], dim=1)
        merged_scores = torch.cat(
            [scores[:, : k - quota], self._rescore(users, popular), scores[:, k - quota :]], dim=1
        ).masked_fill(merged == 0, -torch.inf)
        order = torch.argsort((merged == 0).to(torch.int8), dim=1, stable=True)[:, :k]
        return merged_scores.gather(1, order), merged.gather(1, order)

    def _channel_top(
        self,
        quota: int,
        taken: Tensor,
        ex_offsets: Tensor,
        ex_items: Tensor,
        times: Tensor | None,
    ) -> Tensor:
        """The channel's best `quota` news per row (b, quota), 0 = none: not excluded, not in
        `taken` (b, t) and, given times (b,), first seen before them."""
        assert self.channel_ is not None
        if times is None:  # every news in the logs is eligible: a prefix of the order suffices
            return self._channel_prefix(quota, taken, ex_offsets, ex_items)
        step = max(1, SCORE_BLOCK // (self.num_news_ + 1))
        rows = tensor_segment_ids(ex_offsets)
        out = []
        for s in range(0, len(taken), step):
            block = taken[s : s + step]
            scores = self.channel_.repeat(len(block), 1)  # (b, N+1)
            scores.masked_fill_(self.first_seen_ >= times[s : s + step, None], -torch.inf)
            scores.scatter_(1, block, -torch.inf)
            top = mask_excluded(scores, s, rows, ex_items).topk(quota, dim=1)
            out.append(top.indices.masked_fill(top.values == -torch.inf, 0))
        return torch.cat(out)

    def _channel_prefix(
        self, quota: int, taken: Tensor, ex_offsets: Tensor, ex_items: Tensor
    ) -> Tensor:
        """`_channel_top` without times, from the first quota + t + E news of the order."""
        extra = int(ex_offsets.diff().max()) if len(ex_items) else 0
        pool = self.channel_order_[: quota + taken.shape[1] + extra]
        width = self.num_news_ + 1
        rows = torch.arange(len(taken))[:, None] * width
        blocked = torch.cat([(rows + taken).ravel(), pair_keys(ex_offsets, ex_items, width)])
        found = pool.expand(len(taken), -1).masked_fill(isin_sorted(rows + pool, blocked), 0)
        order = torch.argsort((found == 0).to(torch.int8), dim=1, stable=True)[:, :quota]
        picked = found.gather(1, order)
        return torch.cat([picked, picked.new_zeros(len(taken), quota - picked.shape[1])], 1)


def mask_excluded(scores: Tensor, start: int, rows: Tensor, items: Tensor) -> Tensor:
    """Scores (b, N+1) of users start:start+b with padding and excluded news (CSR rows/items
    over all users) set to -inf, in place."""
    scores[:, 0] = -torch.inf
    part = (rows >= start) & (rows < start + len(scores))
    scores[rows[part] - start, items[part]] = -torch.inf
    return scores
