"""Item-level statistics of the popularity/freshness recall channel, from the behavior logs.

popularity  clicks of the click split, each decayed by its age at the end of the logs:
            sum of 0.5 ** ((t_end - t_click) / half_life)
first_seen  the first impression time at which an item was shown or sat in a history

The channel ranks an item by (popularity + prior) * 0.5 ** ((t_end - first_seen) / half_life):
popular items fade as their clicks age, items new to the logs start at `prior` clicks. Every
factor of time is common to all items, so the order is static; at time t only items first seen
before t are eligible (in serving: every item the logs hold). Items never seen are never offered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmnewsrec.formats.store import DAY, NEVER, first_appearance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemStats:
    """Per news index (N+1,), row 0 padding: decayed clicks and first-seen times."""

    popularity: np.ndarray  # float64, clicks decayed to `end`
    first_seen: np.ndarray  # int64 unix seconds; NEVER when absent from the logs
    end: int  # the last impression time of the logs
    half_life_days: float  # of the click decay and of the freshness

    def channel_scores(self, prior: float = 1.0) -> np.ndarray:
        """(N+1,) float32 log-scores of the channel order; -inf for items never seen."""
        seen = self.first_seen != NEVER
        age_days = (self.end - np.where(seen, self.first_seen, self.end)) / DAY
        scores = np.log(self.popularity + prior) - np.log(2.0) * age_days / self.half_life_days
        scores = np.where(seen, scores, -np.inf).astype(np.float32)
        scores[0] = -np.inf
        return scores


def item_stats(
    logs: Sequence[Any], clicks: Any, num_news: int, half_life_days: float = 1.0
) -> ItemStats:
    """Statistics from behavior logs (`Behaviors` of every split) and the split whose clicks
    count as popularity (labelled)."""
    if half_life_days <= 0:
        raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
    first_seen = first_appearance(logs, num_news)
    end = int(max((np.max(log.times) for log in logs if len(log.times)), default=0))
    clicked = np.asarray(clicks.candidate_labels) == 1
    click_times = clicks.item_times()[clicked]
    decay = 0.5 ** ((end - click_times) / (half_life_days * DAY))
    items = np.asarray(clicks.candidate_items)[clicked]
    popularity = np.bincount(items, weights=decay, minlength=num_news + 1)
    seen = int((first_seen[1:] != NEVER).sum())
    logger.info("item stats: %d of %d news in the logs, %d clicks", seen, num_news, len(items))
    return ItemStats(popularity, first_seen, end, half_life_days)


def store_item_stats(store: Any, click_split: str, half_life_days: float = 1.0) -> ItemStats:
    """`item_stats` over every split of a `Store`, popularity from `click_split`'s clicks."""
    logs = [store.behaviors(split) for split in store.splits]
    return item_stats(logs, store.behaviors(click_split), store.num_news, half_life_days)
