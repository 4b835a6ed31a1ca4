"""Serving: a `Recommender` over a trained run, and the HTTP app with its page."""

from mmnewsrec.serve.app import ServeSettings, create_app
from mmnewsrec.serve.recommender import (
    NewsDetail,
    NewsSummary,
    Recommendation,
    RecommendedNews,
    Recommender,
)

__all__ = [
    "NewsDetail",
    "NewsSummary",
    "Recommendation",
    "RecommendedNews",
    "Recommender",
    "ServeSettings",
    "create_app",
]
