"""Beyond accuracy: what the top of each ranking holds, and whom accuracy serves.

Every list is the top `k` (10) news of one ranking, a row of an (L, k) int matrix of news indices
(0 = padding, where the ranking is shorter than k). All functions are pure and vectorised over
the lists; the serving side can call them on the lists it returned.

- intra-list diversity (Ziegler et al. 2005; Smyth & McClave 2001): the mean over pairs of items
  of a list of the cosine distance 1 - cos(v_i, v_j) of their news vectors, averaged over lists.
  From unit vectors u: sum_{i<j} cos = (|sum_i u_i|^2 - sum_i |u_i|^2) / 2, so no pair is formed.
- category entropy: the Shannon entropy (bits) of the categories of a list, averaged over lists.
- catalogue coverage (Ge et al. 2010; Herlocker et al. 2004): the share of the catalogue (here,
  the news that are candidates somewhere in the split) that appears in at least one list.
- novelty (Zhou et al. 2010; Vargas & Castells 2011): the mean self-information -log2 p(i) of
  the listed news, p(i) = (u_i + 1) / (U + 1) the add-one smoothed share of the U users who
  clicked news i in the training log.
- personalisation (Zhou et al. 2010): 1 - the mean over pairs of lists of |L_a & L_b| / k. The sum
  of overlaps over all pairs is sum_i n_i (n_i - 1) / 2 over the news i in n_i lists, so the
  L (L - 1) / 2 pairs are never formed.
- image share: the share of listed news that have an image, beside that of the clicked news.
- accuracy by history length (clicks before the impression: 0, 1-5, 6-20, > 20) and by candidate
  age (hours since the news first appeared in any log: < 6, 6-24, > 24): the per-impression
  metrics of the impressions of a history bucket, and of each impression restricted to the
  candidates of an age bucket (scored where that restriction keeps a click and a non-click).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmnewsrec.csr import csr_offsets, segment_ids
from mmnewsrec.metrics import METRICS, impression_metrics, ranks_from_scores

if TYPE_CHECKING:
    from mmnewsrec.formats.store import Behaviors, Store

TOP_K = 10
HISTORY_BUCKETS = (("0", 0, 0), ("1-5", 1, 5), ("6-20", 6, 20), (">20", 21, None))
AGE_BUCKETS = (("<6 h", 0.0, 6.0), ("6-24 h", 6.0, 24.0), (">24 h", 24.0, None))
BEYOND_COLUMNS = ("diversity", "category_entropy", "novelty", "image_share")  # per list
LIST_CHUNK = 8192  # lists whose vectors are gathered at once (8192 x 10 x 384 float32: 126 MB)


def top_k_lists(
    scores: np.ndarray, items: np.ndarray, offsets: np.ndarray, k: int = TOP_K
) -> np.ndarray:
    """(I, k) int32: the news indices of each impression's k best-scored candidates, best
    first (ties ordered as the metrics order them); 0 pads shorter impressions."""
    ranks = ranks_from_scores(scores, offsets)
    top = ranks <= k
    lists = np.zeros((len(offsets) - 1, k), dtype=np.int32)
    lists[segment_ids(offsets)[top], ranks[top] - 1] = np.asarray(items)[top]
    return lists


def intra_list_diversity(lists: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(L,) mean pairwise cosine distance of each list's news vectors (NaN: < 2 items)."""
    out = np.empty(len(lists))
    for start in range(0, len(lists), LIST_CHUNK):
        part = lists[start : start + LIST_CHUNK]
        v = np.asarray(vectors[part.ravel()], dtype=np.float32).reshape(*part.shape, -1)
        norms = np.linalg.norm(v, axis=2, keepdims=True)
        u = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)  # padding stays zero
        n = (part > 0).sum(axis=1)
        total = np.square(u.sum(axis=1)).sum(axis=1) - np.square(u).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start : start + LIST_CHUNK] = 1.0 - total / (n * (n - 1))
    return out


def category_entropy(lists: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """(L,) Shannon entropy in bits of the categories (int codes by news index) of each list
    (NaN for an empty list)."""
    codes = np.asarray(categories)[lists]
    width = int(codes.max(initial=0)) + 1
    row = np.repeat(np.arange(len(lists)), lists.shape[1])
    valid = lists.ravel() > 0
    counts = np.bincount(
        row[valid] * width + codes.ravel()[valid], minlength=len(lists) * width
    ).reshape(len(lists), width)
    n = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = counts / n
        terms = np.where(counts > 0, -share * np.log2(np.where(counts > 0, share, 1.0)), 0.0)
    return np.where(n[:, 0] > 0, terms.sum(axis=1), np.nan)


def coverage(lists: np.ndarray, catalogue: np.ndarray) -> float:
    """Share of the `catalogue` news indices that appear in at least one list."""
    catalogue = np.unique(np.asarray(catalogue))
    shown = np.unique(lists[lists > 0])
    return float(np.isin(catalogue, shown).mean()) if len(catalogue) else float("nan")


def user_popularity(users: np.ndarray, items: np.ndarray, num_news: int) -> np.ndarray:
    """(N+1,) p(i) = (u_i + 1) / (U + 1) from (user, news) click pairs: u_i the distinct users
    who clicked news i, U the distinct users."""
    keys = np.asarray(users, dtype=np.int64) * (num_news + 1) + np.asarray(items, dtype=np.int64)
    clicked_by = np.bincount(np.unique(keys) % (num_news + 1), minlength=num_news + 1)
    return (clicked_by + 1.0) / (len(np.unique(users)) + 1.0)


def novelty(lists: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """(L,) mean -log2 p(i) over each list's news (NaN for an empty list)."""
    valid = lists > 0
    information = np.where(valid, -np.log2(np.asarray(popularity)[lists]), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return information.sum(axis=1) / valid.sum(axis=1)


def personalisation(lists: np.ndarray) -> float:
    """1 - mean over pairs of lists of |L_a & L_b| / k (k = the lists' width)."""
    num, k = lists.shape
    if num < 2:
        return float("nan")
    width = int(lists.max(initial=0)) + 1
    row = np.repeat(np.arange(num, dtype=np.int64), k)
    items = np.unique(row * width + lists.ravel()) % width  # each (list, news) once
    in_lists = np.bincount(items[items > 0]).astype(np.float64)  # n_i, padding left out
    shared = (in_lists * (in_lists - 1) / 2).sum()
    return float(1.0 - shared / k / (num * (num - 1) / 2))


def image_share(lists: np.ndarray, has_image: np.ndarray) -> np.ndarray:
    """(L,) share of each list's news with an image (NaN for an empty list)."""
    valid = lists > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(has_image)[lists] & valid).sum(axis=1) / valid.sum(axis=1)


def bucket_of(values: np.ndarray, buckets: tuple) -> np.ndarray:
    """(n,) index of the (name, low, high) bucket holding each value (low <= v < high for
    floats, low <= v <= high for ints; high None: no bound)."""
    values = np.asarray(values)
    out = np.full(len(values), -1, dtype=np.int64)
    for b, (_, low, high) in enumerate(buckets):
        inside = values >= low
        if high is not None:
            inside &= (values <= high) if values.dtype.kind in "iu" else (values < high)
        out[inside & (out < 0)] = b
    return out


def by_history(per_impression: dict[str, np.ndarray], history_len: np.ndarray) -> dict:
    """{bucket: {metric means over its scored impressions, "impressions": count}}."""
    bucket = bucket_of(np.asarray(history_len), HISTORY_BUCKETS)
    out = {}
    for b, (name, _, _) in enumerate(HISTORY_BUCKETS):
        scored = (bucket == b) & ~np.isnan(per_impression["auc"])
        count = int(scored.sum())
        means = {m: float(per_impression[m][scored].mean()) if count else None for m in METRICS}
        out[name] = {**means, "impressions": count}
    return out


def by_candidate_age(
    scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray, age_hours: np.ndarray
) -> dict:
    """{bucket: {metric means, "impressions": count}} of each impression restricted to the
    candidates whose age (hours since first seen) is in the bucket."""
    bucket = bucket_of(np.round(np.asarray(age_hours, dtype=np.float64), 6), AGE_BUCKETS)
    sizes_of = np.diff(offsets)
    row = segment_ids(offsets)
    out = {}
    for b, (name, _, _) in enumerate(AGE_BUCKETS):
        keep = bucket == b
        sizes = np.bincount(row[keep], minlength=len(sizes_of))
        result = impression_metrics(
            np.asarray(scores)[keep], np.asarray(labels)[keep], csr_offsets(sizes)
        ).summary()
        count = int(result["impressions"])
        out[name] = {m: (result[m] if count else None) for m in METRICS}
        out[name]["impressions"] = count
    return out


def list_metrics(
    lists: np.ndarray,
    vectors: np.ndarray,
    categories: np.ndarray,
    popularity: np.ndarray,
    has_image: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per list (row of `lists`): diversity, category entropy, novelty and image share; the
    per-news arrays are indexed by news index (for serving: the lists /recommend returned)."""
    return {
        "diversity": intra_list_diversity(lists, vectors),
        "category_entropy": category_entropy(lists, categories),
        "novelty": novelty(lists, popularity),
        "image_share": image_share(lists, has_image),
    }


def describe_rankings(
    scores: np.ndarray,
    behaviors: Behaviors,
    vectors: np.ndarray,
    has_image: np.ndarray,
    categories: np.ndarray,
    popularity: np.ndarray,
    age_hours: np.ndarray | None,
    k: int = TOP_K,
) -> tuple[dict, dict[str, np.ndarray]]:
    """The beyond-accuracy summary of one scored split (the metrics above, the breakdowns) and
    its per-impression columns (accuracy, history length, diversity, entropy, novelty, image
    share), from arrays indexed by news index (row 0: padding)."""
    labels = np.asarray(behaviors.candidate_labels)
    offsets = np.asarray(behaviors.candidate_offsets)
    accuracy = impression_metrics(scores, labels, offsets)
    lists = top_k_lists(scores, behaviors.candidate_items, offsets, k)
    clicked = np.asarray(behaviors.candidate_items)[labels == 1]
    clicked_share = float(np.asarray(has_image)[clicked].mean()) if len(clicked) else None
    columns = {
        "impression_id": np.asarray(behaviors.impression_ids),
        **{name: getattr(accuracy, name) for name in METRICS},
        "history_len": np.diff(np.asarray(behaviors.history_offsets)),
        **list_metrics(lists, vectors, categories, popularity, has_image),
    }
    summary: dict = {
        "k": k,
        **{name: _mean(columns[name]) for name in BEYOND_COLUMNS},
        "coverage": coverage(lists, behaviors.candidate_items),
        "personalisation": personalisation(lists),
        "clicked_image_share": clicked_share,
    }
    breakdowns = {"by_history": by_history(columns, columns["history_len"])}
    if age_hours is not None:
        breakdowns["by_candidate_age"] = by_candidate_age(scores, labels, offsets, age_hours)
    return {"beyond_accuracy": summary, **breakdowns}, columns


def _mean(values: np.ndarray) -> float | None:
    """Mean over the non-NaN values (None if there are none)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if len(kept) else None


def store_arrays(
    store: Store, split: str, train_split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The inputs of `describe_rankings` read from a store: (category codes by news index,
    popularity, candidate age in hours). Popularity counts the users who clicked each news in
    the train split (history and clicked candidates), else in the split's own histories; the
    age comes from the store's freshness signal (None for a store without signals)."""
    from mmnewsrec.formats.store import StoreError

    codes = np.unique(store.news["category"].fill_null("").to_numpy(), return_inverse=True)[1]
    source = store.behaviors(train_split if train_split in store.splits else split)
    users = np.asarray(source.user_index)
    pair_users = [users[segment_ids(np.asarray(source.history_offsets))]]
    pair_items = [np.asarray(source.history_items)]
    if source.labelled and source.split != split:
        clicked = np.asarray(source.candidate_labels) == 1
        pair_users.append(users[segment_ids(np.asarray(source.candidate_offsets))][clicked])
        pair_items.append(np.asarray(source.candidate_items)[clicked])
    popularity = user_popularity(
        np.concatenate(pair_users), np.concatenate(pair_items), store.num_news
    )
    try:
        age = np.expm1(store.signals(split, ["freshness"])[:, 0].astype(np.float64))
    except StoreError:
        age = None
    return np.concatenate([[0], codes + 1]), popularity, age
