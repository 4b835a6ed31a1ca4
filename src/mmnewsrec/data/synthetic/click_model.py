"""The click model and the world it runs in: news, users, histories, impressions and clicks
(see the package docstring; their records in `records`), and the exact click probabilities of
the oracle."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import numpy as np

from mmnewsrec.csr import csr_offsets, pad_rows
from mmnewsrec.data.synthetic.records import Impressions, News, Users
from mmnewsrec.data.synthetic.vocabulary import TIERS, Topics
from mmnewsrec.formats.store import DAY

START = int(datetime(2019, 11, 9, tzinfo=UTC).timestamp())  # first train impression
TRAIN_DAYS, DEV_DAYS = 5, 1
WINDOW_DAYS = 2  # candidates are news published in the last WINDOW_DAYS
ARCHIVE_DAYS = 21  # history news are published up to this long before the window
ARCHIVE_SHARE = 0.3
TIER_SHARES = (0.25, 0.5, 0.25)
HISTORY_MEDIAN, HISTORY_SIGMA = 30, 0.5  # log-normal history length, clipped to 1..50
EMPTY_HISTORIES = 0.01
CHUNK_USERS = 8192  # bounds memory; part of the random stream, so fixed
CHUNK_IMPRESSIONS = 16384


@dataclass(frozen=True)
class ClickModel:
    """Weights of the click model described in the module docstring."""

    interest: float = 3.5  # candidate in one of the user's interest subcategories
    category: float = 0.6  # same category as an interest, other subcategory
    quality: float = 1.0  # times the quality tier (-1, 0, +1)
    style: float = 2.0  # image in the user's preferred visual style
    age_per_day: float = 0.5  # hidden recency penalty per day since publication
    buzz: float = 1.0  # times the hidden appeal b(n) ~ N(0, 1) of a news item
    style_users: float = 0.5  # share of users with a preferred visual style
    interest_draws: float = 0.15  # share of candidate draws from the user's interests
    clicks: tuple[float, float, float] = (0.6, 0.25, 0.15)  # P(1, 2, 3 clicks)


@dataclass(frozen=True)
class SynthConfig:
    """Size and seed of a synthetic data set; the defaults suit the demo."""

    news: int = 3000
    users: int = 2500
    impressions: int = 15000
    seed: int = 0
    dev_share: float = 0.2
    image_share: float = 0.5
    image_size: int = 128
    model: ClickModel = field(default_factory=ClickModel)

    def __post_init__(self) -> None:
        if self.news < 200 or self.users < 1 or self.impressions < 10:
            raise ValueError("synthetic data needs news >= 200, users >= 1, impressions >= 10")
        if not (0 < self.dev_share < 1 and 0 <= self.image_share <= 1):
            raise ValueError("dev_share must lie in (0, 1) and image_share in [0, 1]")
        if not 32 <= self.image_size <= 512:
            raise ValueError("image_size must lie in [32, 512]")

    @classmethod
    def quick(cls, seed: int = 0) -> SynthConfig:
        """A small data set for tests and quick runs."""
        return cls(news=500, users=300, impressions=2000, seed=seed)


def make_news(rng: np.random.Generator, config: SynthConfig, share: np.ndarray) -> News:
    n = config.news
    live_from = START - WINDOW_DAYS * DAY
    end = START + (TRAIN_DAYS + DEV_DAYS) * DAY
    has_image = rng.random(n) < config.image_share
    archive = rng.random(n) < ARCHIVE_SHARE
    return News(
        sub=rng.choice(len(share), n, p=share),
        tier=rng.choice(TIERS, n, p=TIER_SHARES),
        style=np.where(has_image, rng.integers(0, 2, n), -1),
        published=np.where(
            archive,
            rng.integers(live_from - ARCHIVE_DAYS * DAY, live_from, n),
            rng.integers(live_from, end, n),
        ),
        archive=archive,
        buzz=rng.standard_normal(n),
    )


def make_users(
    rng: np.random.Generator, config: SynthConfig, topics: Topics, share: np.ndarray
) -> Users:
    n, n_sub = config.users, len(topics.subcategories)
    count = rng.choice([1, 2, 3], n, p=[0.3, 0.4, 0.3])
    ranked = np.argsort(-(np.log(share) + rng.gumbel(size=(n, n_sub))), axis=1)[:, :3]
    interests = np.where(np.arange(3) < count[:, None], ranked, -1)
    likes = np.zeros((n, n_sub), bool)
    rows, cols = np.nonzero(interests >= 0)
    likes[rows, interests[rows, cols]] = True
    category = np.eye(len(topics.categories), dtype=np.int64)[topics.category_of]  # (S, C)
    return Users(
        interests=interests,
        likes=likes,
        likes_category=(likes @ category) > 0,
        style=np.where(rng.random(n) < config.model.style_users, rng.integers(0, 2, n), -1),
    )


def utility(
    model: ClickModel,
    users: Users,
    topics: Topics,
    user: np.ndarray,
    sub: np.ndarray,
    tier: np.ndarray,
    style: np.ndarray,
    age_days: np.ndarray | float = 0.0,
    buzz: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Utility z of news with the given attributes for users (arrays broadcast together);
    `age_days` and `buzz` are the hidden terms (0: left out)."""
    own = users.likes[user, sub]
    near = users.likes_category[user, topics.category_of[sub]] & ~own
    styled = (style >= 0) & (style == users.style[user])
    return (
        model.interest * own
        + model.category * near
        + model.quality * tier
        + model.style * styled
        - model.age_per_day * age_days
        + model.buzz * buzz
    )


def _first_occurrences(group: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each (group, item) pair, in ascending order."""
    _, first = np.unique(group * (int(item.max()) + 1) + item, return_index=True)
    return np.sort(first)


def _draw_rows(rng: np.random.Generator, weight: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """draws[r] column indices from row r of weight (R, C), with probability proportional to it."""
    rows, cols = weight.shape
    cdf = np.cumsum(weight, axis=1)
    cdf /= cdf[:, -1:]
    row = np.repeat(np.arange(rows), draws)
    target = row + rng.random(len(row)) * (1 - 1e-9)  # stays inside the row's [r, r + 1)
    return (
        np.searchsorted((cdf + np.arange(rows)[:, None]).ravel(), target, side="right") - row * cols
    )


def draw_histories(
    rng: np.random.Generator, model: ClickModel, users: Users, news: News, topics: Topics
) -> tuple[np.ndarray, np.ndarray]:
    """Clicked archive news per user (CSR offsets, news rows), drawn from the click model.

    Archive news fall into cells (subcategory, tier, style) of equal utility for a user, so each
    draw picks a cell by weight count * exp(z), then a news item inside the cell. The first
    `length` distinct items of such draws are a Plackett-Luce sample without replacement.
    """
    n_users = len(users.style)
    length = np.rint(rng.lognormal(np.log(HISTORY_MEDIAN), HISTORY_SIGMA, n_users))
    length = np.clip(length, 1, 50).astype(np.int64)
    length[rng.random(n_users) < EMPTY_HISTORIES] = 0
    archive = np.flatnonzero(news.archive)
    cell_of = (news.sub[archive] * 3 + news.tier[archive] + 1) * 3 + news.style[archive] + 1
    n_cells = len(topics.subcategories) * 9
    members = archive[np.argsort(cell_of, kind="stable")]
    counts = np.bincount(cell_of, minlength=n_cells)
    starts = np.cumsum(counts) - counts
    cells = np.arange(n_cells)
    owner_parts, cell_parts = [], []
    for a in range(0, n_users, CHUNK_USERS):
        user = np.arange(a, min(a + CHUNK_USERS, n_users))
        z = utility(
            model, users, topics, user[:, None], cells // 9, cells // 3 % 3 - 1, cells % 3 - 1
        )
        draws = np.where(length[user] > 0, 4 * length[user] + 20, 0)  # spares for repeats
        owner_parts.append(np.repeat(user, draws))
        weight = counts * np.exp(z - z.max(axis=1, keepdims=True))
        cell_parts.append(_draw_rows(rng, weight, draws))
    owner, cell = np.concatenate(owner_parts), np.concatenate(cell_parts)
    item = members[starts[cell] + (rng.random(len(owner)) * counts[cell]).astype(np.int64)]
    keep = _first_occurrences(owner, item)
    owner, item = owner[keep], item[keep]
    keep = np.arange(len(owner)) - csr_offsets(np.bincount(owner, minlength=n_users))[owner]
    owner, item = owner[keep < length[owner]], item[keep < length[owner]]
    order = np.lexsort((item, news.published[item], owner))
    return csr_offsets(np.bincount(owner, minlength=n_users)), item[order]


def _draw_candidates(
    rng: np.random.Generator,
    model: ClickModel,
    users: Users,
    news: News,
    user: np.ndarray,
    when: np.ndarray,
    size: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct recent news per impression (impression, news row), in random order."""
    n_draws = 2 * size + 10  # extra draws make up for repeats
    imp = np.repeat(np.arange(len(size)), n_draws)
    t, u = when[imp], user[imp]
    window = WINDOW_DAYS * DAY
    live = np.flatnonzero(~news.archive)
    by_time = live[np.argsort(news.published[live], kind="stable")]
    lo = np.searchsorted(news.published[by_time], t - window, side="left")
    hi = np.searchsorted(news.published[by_time], t, side="right")
    if (hi <= lo).any():
        raise ValueError("too few news for the candidate window; increase the number of news")
    pick = by_time[lo + (rng.random(len(imp)) * (hi - lo)).astype(np.int64)]
    span = int(news.published.max()) + window + 1  # sort key: subcategory, then time
    by_sub = live[np.lexsort((news.published[live], news.sub[live]))]
    keys = news.sub[by_sub] * span + news.published[by_sub]
    n_interests = (users.interests >= 0).sum(axis=1)
    sub = users.interests[u, (rng.random(len(imp)) * n_interests[u]).astype(np.int64)]
    lo = np.searchsorted(keys, sub * span + t - window, side="left")
    hi = np.searchsorted(keys, sub * span + t, side="right")
    offset = np.minimum(lo + (rng.random(len(imp)) * (hi - lo)).astype(np.int64), len(keys) - 1)
    wanted = (rng.random(len(imp)) < model.interest_draws) & (hi > lo)
    pick = np.where(wanted, by_sub[offset], pick)
    keep = _first_occurrences(imp, pick)
    imp, pick = imp[keep], pick[keep]
    rank = np.arange(len(imp)) - csr_offsets(np.bincount(imp, minlength=len(size)))[imp]
    keep = rank < size[imp]
    return imp[keep], pick[keep]


def make_impressions(
    rng: np.random.Generator, config: SynthConfig, users: Users, news: News, topics: Topics
) -> Impressions:
    model, n = config.model, config.impressions
    n_dev = max(1, round(n * config.dev_share))
    activity = rng.lognormal(0.0, 1.0, config.users)
    user = rng.choice(config.users, n, p=activity / activity.sum())
    dev_start = START + TRAIN_DAYS * DAY
    when = np.concatenate(
        [
            np.sort(rng.integers(START, dev_start, n - n_dev)),
            np.sort(rng.integers(dev_start, dev_start + DEV_DAYS * DAY, n_dev)),
        ]
    )
    size = rng.integers(5, 51, n)
    imp_parts, item_parts = [], []
    for a in range(0, n, CHUNK_IMPRESSIONS):
        part = slice(a, a + CHUNK_IMPRESSIONS)
        drawn = _draw_candidates(rng, model, users, news, user[part], when[part], size[part])
        imp_parts.append(drawn[0] + a)
        item_parts.append(drawn[1])
    imp, items = np.concatenate(imp_parts), np.concatenate(item_parts)
    offsets = csr_offsets(np.bincount(imp, minlength=n))
    if np.diff(offsets).min() < 5:
        raise ValueError("too few news for 5 candidates per impression; increase the news")
    age = (when[imp] - news.published[items]) / DAY
    attributes = news.sub[items], news.tier[items], news.style[items], age, news.buzz[items]
    z = utility(model, users, topics, user[imp], *attributes)
    clicks = rng.choice([1, 2, 3], n, p=model.clicks)
    key = z + rng.gumbel(size=len(z))  # the m largest keys: m Plackett-Luce draws
    dense, _ = pad_rows(key, offsets, -np.inf)
    kth = -np.sort(-dense, axis=1)[np.arange(n), clicks - 1]  # (I,) m-th largest key
    return Impressions(
        user=user,
        time=when,
        n_train=n - n_dev,
        offsets=offsets,
        items=items,
        labels=key >= kth[imp],
        utility=z,
    )


def _inclusion(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(item among the first 1, 2, 3 Plackett-Luce draws) for weights w (B, K), 0 = padding."""
    total = w.sum(axis=1, keepdims=True)
    first = w / total
    b = w / (total * (total - w))  # (B, K) P(j first) / weight left after j
    second = w * (b.sum(axis=1, keepdims=True) - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = b[:, :, None] * w[:, None, :] / (total[:, :, None] - w[:, :, None] - w[:, None, :])
    diagonal = np.arange(w.shape[1])
    a[:, diagonal, diagonal] = 0.0  # a[j, k]: P(j first, k second) / weight left after both
    third = w * (a.sum(axis=(1, 2))[:, None] - a.sum(axis=2) - a.sum(axis=1))
    return first, first + second, first + second + third


def click_probability(
    utility: np.ndarray,
    offsets: np.ndarray,
    clicks: tuple[float, float, float] = ClickModel.clicks,
    chunk: int = 1024,
) -> np.ndarray:
    """Exact P(clicked) per candidate when m ~ clicks (1-3) are drawn by Plackett-Luce on exp(z).

    Needs at least 4 candidates per impression; vectorised over chunks of impressions.
    """
    out = np.empty(len(utility))
    for a in range(0, len(offsets) - 1, chunk):
        part = offsets[a : a + chunk + 1]
        z, (row, col) = pad_rows(utility[part[0] : part[-1]], part, -np.inf)
        w = np.exp(z - z.max(axis=1, keepdims=True))
        probability = cast(
            np.ndarray, sum(p * m for p, m in zip(clicks, _inclusion(w), strict=True))
        )
        out[part[0] : part[-1]] = probability[row, col]
    return out
