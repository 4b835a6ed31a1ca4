"""Recall: user vectors from clicked news and cosine top-K over all news."""

from mmnewsrec.recall.recaller import Recaller, mean_user_vectors, padded_to_csr

__all__ = ["Recaller", "mean_user_vectors", "padded_to_csr"]
