"""Live recommendations for one click history: recall by the mean user vector, rerank with a
trained model, fall back to the most clicked news when nothing in the history is known."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from mmnewsrec.formats.store import SIGNAL_NAMES
from mmnewsrec.growing import GrowingRows, append_rows

if TYPE_CHECKING:
    from mmnewsrec.formats.store import Store
    from mmnewsrec.formats.vectors import NewsVectors
    from mmnewsrec.rank.ranker import TrainedRanker
    from mmnewsrec.serve.live import Popularity
    from mmnewsrec.serve.new_news import NewNews

logger = logging.getLogger(__name__)

RECALL_CACHE_USERS = 10_000  # users whose latest recall is kept (about 2.5 KB each)
# users whose history encoding is kept: up to (1 + L) x d_model floats each, 26 KB at the cpu
# preset (L 50, d 128), 52 MB for 2,000 users
HISTORY_CACHE_USERS = 2_000
SignalSource = Callable[[np.ndarray, np.ndarray], np.ndarray]
V = TypeVar("V")


class UserCache(Generic[V]):
    """The latest value computed for each of the `size` users asked last, with the key it was
    computed from (their history): `get` reuses it only for an equal key, so a user's next
    click, which changes their history, computes it again. Safe across threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: OrderedDict[str, tuple[Hashable, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, user: str | None, key: Hashable, compute: Callable[[], V]) -> V:
        """`user`'s value for `key`, kept or computed (always computed for no user)."""
        if user is None:
            return compute()
        with self._lock:
            kept = self._kept.get(user)
            if kept is not None and kept[0] == key:
                self._kept.move_to_end(user)
                return kept[1]
        value = compute()
        with self._lock:
            self._kept[user] = (key, value)
            self._kept.move_to_end(user)
            if len(self._kept) > self.size:
                self._kept.popitem(last=False)  # the least recently asked
        return value

    def forget(self, user: str | None) -> None:
        """Drop what is kept for `user` (a value that turned out to be a failure)."""
        if user is not None:
            with self._lock:
                self._kept.pop(user, None)

    def __len__(self) -> int:
        return len(self._kept)


@dataclass(frozen=True)
class NewsSummary:
    news_id: str
    title: str
    category: str
    subcategory: str
    has_image: bool


@dataclass(frozen=True)
class NewsDetail(NewsSummary):
    abstract: str
    url: str


@dataclass(frozen=True)
class RecommendedNews(NewsSummary):
    """One recommended news item: its metadata, score and the stage that placed it."""

    score: float  # the score of the stage that placed the item
    stage: str  # "rerank", "recall" (beyond the rerank budget) or "popularity"
    recall_rank: int | None  # 1-based rank in recall; None for popularity


@dataclass(frozen=True)
class Recommendation:
    """What [`Recommender.recommend`][mmnewsrec.serve.recommender.Recommender.recommend]
    returns, and `POST /recommend` answers as JSON."""

    items: list[RecommendedNews]
    unknown: list[str]  # history ids not in the store, ignored
    history_used: list[str]  # the known ids that were scored (the last L), oldest first
    timings_ms: dict[str, float]
    cold_start: bool = False  # no known click: the list ranks news by popularity and freshness


class Recommender:
    """Recommendations for a click history from a trained run: recall the top `recall_k`
    news by the mean vector of the last L known clicks (L: the ranker's history length),
    rerank them with the trained ranker, return the top k. Everything is loaded once; a
    request costs one search over the corpus and one forward pass over `recall_k`
    candidates. `mmnewsrec serve` answers HTTP requests with one.

    Example:
        ```text
        recommender = Recommender.from_run("runs/fast")
        for item in recommender.recommend(["N55189", "N42782"], k=5).items:
            print(item.news_id, item.score, item.title)
        ```
    """

    def __init__(
        self,
        store: Store,
        vectors: NewsVectors,
        ranker: TrainedRanker,
        recall_k: int = 200,
        recall_backend: str = "auto",
        index_dir: Path | None = None,
        trace: bool = True,
        popular_share: float | None = None,
    ) -> None:
        """Build the recall index and warm the model up.

        Args:
            store: The store the run was trained on.
            vectors: Its news vectors (the run's own, for a fine-tuned run).
            ranker: The trained model.
            recall_k: News recalled, then reranked.
            recall_backend: See `from_run`.
            index_dir: Where the recall index is kept between starts (the vectors' folder).
            trace: Rerank through a TorchScript trace of the model (`TrainedRanker.trace`).
            popular_share: Share of `recall_k` for the popularity/freshness channel (None:
                the evaluated default, 0.1).

        Raises:
            ValueError: A ranker that reads behaviour signals, or vectors of other news.
        """
        from mmnewsrec.rank.model import Ranker
        from mmnewsrec.recall import DEFAULT_POPULAR_SHARE, Recaller

        if recall_k < 1:
            raise ValueError(f"recall_k must be >= 1, got {recall_k}")
        check_same_news(store, vectors)
        if isinstance(ranker.model, Ranker):
            ranker.model.cache_news_tokens()  # per request: lookups instead of projections
        if trace:
            ranker.trace()  # after the cache, which the trace then holds
        self.store, self.vectors, self.ranker, self.recall_k = store, vectors, ranker, recall_k
        share = DEFAULT_POPULAR_SHARE if popular_share is None else popular_share
        self.recaller = Recaller(recall_k, recall_backend, popular_share=share)
        self.recaller.fit_store(
            vectors,
            store,
            ranker.config.data.train_split,
            shared_news_matrix(ranker, vectors),
            index_dir,
        )
        news = store.news
        # A dict answers one request's lookups in microseconds (Store.news_index builds a
        # mapping over the whole corpus per call, meant for batch work). It, the lists and the
        # growing tables below are shared with the copies that added news make (`with_news`),
        # which append to them; this one reads its first `num_news` news only.
        self._index = {news_id: i + 1 for i, news_id in enumerate(news["news_id"].to_list())}
        self._columns = {
            name: [None, *news[name].to_list()]
            for name in ("news_id", "title", "category", "subcategory", "abstract", "url")
        }
        self._images = [None, *news["image_path"].to_list()]
        self._num_news = store.num_news
        self._titles_lower = news["title"].str.to_lowercase()
        self._added_titles: list[str] = []  # those of the news added, lower case
        self._grown: dict[str, GrowingRows] = {}
        self._adding = threading.Lock()  # one `with_news` at a time, in this and its copies
        self.clicks = self._train_clicks()
        self._counts = {  # /health answers from these, without a pass over the corpus
            "news": store.num_news,
            "news_with_image": sum(p is not None for p in self._images),
            "users": store.num_users,
            "clicked_news": int(np.count_nonzero(self.clicks)),
        }
        self._popular = np.argsort(-self.clicks[1:], kind="stable") + 1  # most clicked first
        self.recall_cache: UserCache[tuple[np.ndarray, np.ndarray]] = UserCache(RECALL_CACHE_USERS)
        # the reranker's encoding of a user's history: the same for the copies `with_news`
        # makes, whose model keeps the weights and the tokens of the news already served
        self.history_cache: UserCache[Future[tuple[Any, ...]]] = UserCache(HISTORY_CACHE_USERS)
        # encodes a history while the request's own thread recalls (both release the GIL)
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="history-encoder")
        # (history, candidates) -> their behaviour signals: needed by a run that reads them
        self.signal_source: SignalSource | None = None
        self._signal_columns = [SIGNAL_NAMES.index(name) for name in ranker.signal_names]
        if not self._signal_columns:
            self.recommend([self._columns["news_id"][1]], k=1)  # warm-up: first forward is slow

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str = "cpu",
        recall_k: int = 200,
        recall_backend: str = "auto",
        trace: bool = True,
        popular_share: float | None = None,
    ) -> Recommender:
        """Load a run's model with the store and news vectors it was trained on.

        Args:
            run_dir: A run folder written by `mmnewsrec train`.
            device: Where the reranker runs: `cpu`, `cuda` or `cuda:N`.
            recall_k: News recalled, then reranked.
            recall_backend: "exact", "faiss_flat", "faiss_hnsw" (approximate, rescored
                exactly; fast at large N) or "auto" (exact up to 20,000 news, faiss_hnsw
                beyond).
            trace: Rerank through a TorchScript trace of the model.
            popular_share: Share of `recall_k` for the popularity/freshness channel (None:
                0.1).
        """
        from mmnewsrec.formats.runs import read_run_config
        from mmnewsrec.formats.store import Store
        from mmnewsrec.formats.vectors import NewsVectors
        from mmnewsrec.rank import load_ranker

        read_run_config(run_dir)  # a run directory at all
        ranker = load_ranker(run_dir, device)
        config = ranker.config  # the checkpoint's: a fine-tuned run's names RUN_DIR/vectors
        store = Store.load(config.data.store_dir)
        vectors = NewsVectors.load(config.data.vectors_dir)
        index_dir = Path(config.data.vectors_dir) / "recall"
        return cls(
            store, vectors, ranker, recall_k, recall_backend, index_dir, trace, popular_share
        )

    def _train_clicks(self) -> np.ndarray:
        """Clicks per news index in the run's train split (zeros when the store lacks it)."""
        from mmnewsrec.rank.model import click_counts

        split = self.ranker.config.data.train_split
        if split not in self.store.splits or not self.store.behaviors(split).labelled:
            logger.warning("no labelled split %r: popularity fallback ranks by index", split)
            return np.zeros(self.store.num_news + 1, dtype=np.int64)
        return click_counts(self.store.behaviors(split), self.store.num_news)

    # ------------------------------------------------------------------ news

    def index_of(self, news_id: str) -> int:
        """Store index of a news id; 0 when unknown (or added after this recommender)."""
        index = self._index.get(news_id, 0)
        return index if index <= self._num_news else 0

    @property
    def news_lookup(self) -> dict[str, int]:
        """News id -> index of every served news item (not to be changed; it may already hold
        news added to a later copy of this recommender)."""
        return self._index

    @property
    def num_news(self) -> int:
        """News served (the store's and those added)."""
        return self._num_news

    def news_ids_of(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        return [self._columns["news_id"][int(i)] for i in indices]

    def summary(self, index: int) -> NewsSummary:
        return NewsSummary(*self._fields(index))

    def detail(self, index: int) -> NewsDetail:
        c = self._columns
        return NewsDetail(*self._fields(index), c["abstract"][index] or "", c["url"][index] or "")

    def _fields(self, index: int) -> tuple[str, str, str, str, bool]:
        c = self._columns
        return (
            c["news_id"][index],
            c["title"][index] or "",
            c["category"][index] or "",
            c["subcategory"][index] or "",
            self._images[index] is not None,
        )

    def image_path(self, index: int) -> Path | None:
        """The image file the store records for a news index, if any."""
        path = self._images[index]
        return Path(path) if path else None

    def search_titles(self, query: str, limit: int = 10) -> list[int]:
        """Indices of news whose title contains `query` (any case), most clicked first."""
        import polars as pl

        query = query.lower()
        found = self._titles_lower.str.contains(query, literal=True).to_numpy()
        added = self._added_titles[: self._num_news - len(found)]
        if added:
            more = pl.Series(added, dtype=pl.String).str.contains(query, literal=True)
            found = np.concatenate([found, more.to_numpy()])
        hits = np.flatnonzero(found) + 1
        return hits[np.argsort(-self.clicks[hits], kind="stable")[:limit]].tolist()

    def info(self) -> dict[str, Any]:
        """What /health reports: model, vectors and corpus counts."""
        return {
            "model": self.ranker.checkpoint["model_name"],
            "device": str(self.ranker.device),
            "max_history": self.ranker.history_len,
            "recall_k": self.recall_k,
            "recall_backend": self.recaller.backend_,
            "recall_popular_share": self.recaller.popular_share,
            "vectors": {"dim": int(self.vectors.dim), "hash": self.vectors.hash},
            "counts": self._counts,
        }

    # ------------------------------------------------------------------ recommend

    def recommend(
        self, history: Sequence[str], k: int = 10, exclude_history: bool = True
    ) -> Recommendation:
        """The top k news for a click history.

        Args:
            history: Clicked news ids, oldest first. Unknown ids are reported and ignored;
                only the last L known clicks are read.
            k: How many news to return.
            exclude_history: Leave the clicked news out.

        Returns:
            The items, best first, with the unknown and used history ids and the timings of
                the stages. Without a known click: the most clicked news of the train split.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        start = time.perf_counter()
        lookup, last = self._index, self._num_news
        indices = [i if (i := lookup.get(news_id, 0)) <= last else 0 for news_id in history]
        unknown = [news_id for news_id, i in zip(history, indices, strict=True) if i == 0]
        known = np.array([i for i in indices if i], dtype=np.int64)
        return self.recommend_known(known, k, exclude_history, unknown, start)

    def recommend_known(
        self,
        known: np.ndarray,
        k: int = 10,
        exclude_history: bool = True,
        unknown: Sequence[str] = (),
        start: float | None = None,
        cold_start: Popularity | None = None,
        user: str | None = None,
    ) -> Recommendation:
        """`recommend` for a history of news indices (oldest first); `cold_start`: what ranks
        the news for a history with no click (default: the train split's most clicked);
        `user`: whose recall (`recall_cache`) and history encoding (`history_cache`) are kept
        and reused while their history (and for recall the corpus) stays the same."""
        start = time.perf_counter() if start is None else start
        known = known[known <= self._num_news]  # clicks on news added since: a later copy's
        used = known[-self.ranker.history_len :]
        exclude = np.unique(known) if exclude_history else known[:0]
        timings = {"lookup": _ms(start)}
        if len(used):
            items = self._recall_rerank(used, exclude, k, timings, known, user)
        elif cold_start is not None:
            top, scores = cold_start.top(k, exclude)
            items = [self._item(i, s, "popularity", None) for i, s in zip(top, scores, strict=True)]
        else:
            items = self._popular_items(exclude, k)
        timings["total"] = _ms(start)
        history_used = [self._columns["news_id"][i] for i in used]
        return Recommendation(items, list(unknown), history_used, timings, not len(used))

    def _recall_rerank(
        self,
        history: np.ndarray,
        exclude: np.ndarray,
        k: int,
        timings: dict[str, float],
        known: np.ndarray,
        user: str | None = None,
    ) -> list[RecommendedNews]:
        start = time.perf_counter()
        # the history's encoding (kept, or computed in the encoder thread meanwhile)
        encoded = self.history_cache.get(
            user,
            history.tobytes(),
            lambda: self._encoder.submit(self.ranker.encode_history, history),
        )
        recall_scores, found = self._recall(history, exclude, max(k, self.recall_k), user)
        timings["recall"] = _ms(start)

        head = found[: self.recall_k]
        signals = self._signals(known, head, timings)
        start = time.perf_counter()
        try:
            encoding = encoded.result()
        except BaseException:
            self.history_cache.forget(user)  # computed again at the next request
            raise
        scores = self.ranker.score_encoded(encoding, head, max(len(head), 1), signals)
        order = np.argsort(-scores, kind="stable")[:k]
        timings["rerank"] = _ms(start)
        items = [self._item(head[j], scores[j], "rerank", int(j) + 1) for j in order]
        tail = range(len(head), min(len(found), len(head) + k - len(items)))
        items += [self._item(found[j], recall_scores[j], "recall", j + 1) for j in tail]
        return items

    def _recall(
        self, history: np.ndarray, exclude: np.ndarray, k: int, user: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Recall's (scores, news indices), from `recall_cache` when `user` asked for the same
        history, exclusions and k since the corpus last changed."""

        def search() -> tuple[np.ndarray, np.ndarray]:
            scores, found = self.recaller.search_one(history, k, exclude)
            keep = found > 0  # 0 = no result (corpus smaller than asked)
            return scores[keep], found[keep]

        key = (history.tobytes(), exclude.tobytes(), k)
        return self.recall_cache.get(user, key, search)

    def _signals(
        self, history: np.ndarray, candidates: np.ndarray, timings: dict[str, float]
    ) -> np.ndarray | None:
        """The signals the ranker reads for these candidates (None for a run without)."""
        if not self._signal_columns:
            return None
        start = time.perf_counter()
        if self.signal_source is None:  # no live state: the signals after the store's logs
            self.signal_source = self._store_signals()
        table = self.signal_source(history, candidates)[:, self._signal_columns]
        timings["signals"] = _ms(start)
        return table

    def _store_signals(self) -> SignalSource:
        """The signals as of the store's last impression: its logs replayed (`prepare`'s
        values), then frozen. A live state (`serve.live`) replaces them with its own."""
        from mmnewsrec.data.signals import SignalState, replay_store

        state = SignalState.for_store(self.store, self.num_news)
        replay_store(state, self.store, self.ranker.config.data.train_split)
        now, lock = state.time or 0, threading.Lock()

        def source(history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
            with lock:  # the state's caches change on reads
                if len(candidates) and int(candidates.max()) > state.num_news:
                    state.grow(int(candidates.max()))  # news added since
                return state.signals(0, now, history, candidates)

        return source

    def _popular_items(self, exclude: np.ndarray, k: int) -> list[RecommendedNews]:
        top = self._popular[: k + len(exclude)]
        top = top[~np.isin(top, exclude)][:k]
        return [self._item(i, self.clicks[i], "popularity", None) for i in top]

    def _item(self, index: int, score: float, stage: str, rank: int | None) -> RecommendedNews:
        return RecommendedNews(*self._fields(int(index)), float(score), stage, rank)

    # ------------------------------------------------------------------ new news

    def with_news(self, news: NewNews, vector: np.ndarray) -> Recommender:
        """A recommender that also serves `news`, of news vector `vector` (D,): a new row of
        the news matrix that recall and the reranker share, of the recall index and of the
        metadata, with no clicks and no image. A server swaps it in; requests still running on
        this one go on with the news it knew. The store on disk does not change.

        Only the new rows are written (amortised O(1) per news item): the news matrix, the
        recall space's scales, the reranker's per-news tables and the metadata are growing
        tables and lists (`mmnewsrec.growing`) shared with this recommender, which reads only
        their first `num_news` rows; the FAISS index takes the item itself; the reranker's trace
        reads the grown tables. Adding to a recommender that is not the latest (one that
        another took news from already) copies its tables first, O(N) once; that copy then
        grows apart."""
        return self.with_news_batch([(news, vector)])

    def with_news_batch(self, added: Sequence[tuple[NewNews, np.ndarray]]) -> Recommender:
        """`with_news` for several news at once."""
        import torch

        ids = [news.news_id for news, _ in added]
        if len(set(ids)) < len(ids):
            raise ValueError("news ids repeated among the added news")
        rows = torch.as_tensor(np.stack([v for _, v in added]), dtype=torch.float32)
        if rows.shape[1] != self.recaller.vectors_.shape[1]:
            raise ValueError(
                f"a news vector of {rows.shape[1]} values; the news have {self.vectors.dim}"
            )
        model = self.ranker.news_model()  # refused before anything is appended
        with self._adding:
            for news_id in ids:
                if self.index_of(news_id):
                    raise ValueError(f"news id {news_id!r} is already served")
            new = self._latest_or_copy()
            new.recaller = self.recaller.appended(rows)
            shared = model.news_vectors is self.recaller.vectors_
            if len(model.news_vectors) != self._num_news + 1:  # a later copy's news in it
                new.ranker = self.ranker.forked(self._num_news)
            table = new.recaller.vectors_ if shared else None
            news_items = [news for news, _ in added]
            categories = torch.as_tensor(
                model.category_ids(
                    [news.category for news in news_items],
                    [news.subcategory for news in news_items],
                )
            )
            new.ranker.add_news(rows, torch.zeros(len(rows), dtype=torch.bool), table, categories)
            new._append_metadata(news_items)
            return new

    def _latest_or_copy(self) -> Recommender:
        """A copy that shares this one's lookups and growing tables (to append to) if it is
        the latest recommender, else one with copies of its part of them."""
        new = copy.copy(self)
        new._grown = dict(self._grown)  # its own: one grown from this later starts anew
        if len(self._images) == self._num_news + 1:
            return new
        count = self._num_news
        new._columns = {name: column[: count + 1] for name, column in self._columns.items()}
        new._images = self._images[: count + 1]
        new._added_titles = self._added_titles[: count - len(self._titles_lower)]
        new._index = {news_id: i for news_id, i in self._index.items() if i <= count}
        return new

    def _append_metadata(self, added: list[NewNews]) -> None:
        """The lookups, lists and counts of this (new) recommender with `added` after its
        news, which have no clicks and no image."""
        first, n = self._num_news + 1, len(added)
        for name, column in self._columns.items():
            column.extend(getattr(news, name) for news in added)
        self._images.extend([None] * n)
        self._added_titles.extend(news.title.lower() for news in added)
        zeros = np.zeros(n, dtype=self.clicks.dtype)
        self.clicks = append_rows(self._grown, "clicks", self.clicks, zeros)
        # last of the news with no clicks
        last = np.arange(first, first + n)
        self._popular = append_rows(self._grown, "popular", self._popular, last)
        self._num_news += n
        self.recall_cache = UserCache(RECALL_CACHE_USERS)  # recalls without the new news
        self._counts = self._counts | {
            "news": self._counts["news"] + n,
            "added_news": self._counts.get("added_news", 0) + n,
        }
        # last: a lookup finds the news once every table holds them
        self._index.update({news.news_id: first + j for j, news in enumerate(added)})


def shared_news_matrix(ranker: TrainedRanker, vectors: NewsVectors) -> Any:
    """The reranker's float32 news matrix when it lives in CPU memory (recall then uses it, no
    second copy); otherwise the stored vectors, which recall converts once."""
    matrix = getattr(ranker.model, "news_vectors", None)
    if matrix is not None and matrix.device.type == "cpu" and matrix.shape == vectors.vectors.shape:
        return matrix
    return vectors.vectors


def check_same_news(store: Store, vectors: NewsVectors) -> None:
    """Refuse vectors whose rows are not this store's news indices."""
    encoded = vectors.manifest.get("store", {}).get("content_hash", store.content_hash)
    if len(vectors.vectors) != store.num_news + 1 or encoded != store.content_hash:
        raise ValueError(
            f"news vectors ({len(vectors.vectors)} rows, store {encoded[:12]}) do not match the "
            f"store {store.path} ({store.num_news} news + padding, {store.content_hash[:12]})"
        )


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
