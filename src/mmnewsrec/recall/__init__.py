"""Recall: user vectors from clicked news, top-K over all news in a space that centres each
part of the vectors, merged with a popularity/freshness channel."""

from mmnewsrec.csr import mean_user_vectors, padded_to_csr
from mmnewsrec.recall.channels import ItemStats, item_stats, store_item_stats
from mmnewsrec.recall.recaller import DEFAULT_POPULAR_SHARE, EXACT_MAX_NEWS, Recaller
from mmnewsrec.recall.space import Part, RecallSpace, vector_parts

__all__ = [
    "DEFAULT_POPULAR_SHARE",
    "EXACT_MAX_NEWS",
    "ItemStats",
    "Part",
    "RecallSpace",
    "Recaller",
    "item_stats",
    "mean_user_vectors",
    "padded_to_csr",
    "store_item_stats",
    "vector_parts",
]
