"""Recall: user vectors from clicked news and cosine top-K over all news."""

from mmnewsrec.csr import mean_user_vectors, padded_to_csr
from mmnewsrec.recall.recaller import Recaller

__all__ = ["Recaller", "mean_user_vectors", "padded_to_csr"]
