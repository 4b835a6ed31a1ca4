"""The MIND leaderboard metrics, as documented: they live on the ground floor, `mmnewsrec.metrics`,
because training and the synthetic data's oracle score with them too."""

from mmnewsrec.metrics import (
    METRICS,
    ImpressionMetrics,
    check_offsets,
    evaluate_scores,
    impression_chunks,
    impression_metrics,
    ranks_from_scores,
)

__all__ = [
    "METRICS",
    "ImpressionMetrics",
    "check_offsets",
    "evaluate_scores",
    "impression_chunks",
    "impression_metrics",
    "ranks_from_scores",
]
