"""Writing a synthetic data set: MIND tsv files, images, the oracle, the hidden truth and the
manifest, into a temporary folder renamed into place."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mmnewsrec.csr import segment_ids
from mmnewsrec.data.synthetic.click_model import (
    ClickModel,
    SynthConfig,
    click_probability,
    draw_histories,
    make_impressions,
    make_news,
    make_users,
    utility,
)
from mmnewsrec.data.synthetic.images import IMAGE_LAYOUTS, write_cards, write_images
from mmnewsrec.data.synthetic.records import Impressions, News, Users
from mmnewsrec.data.synthetic.vocabulary import Topics, all_topics, news_text
from mmnewsrec.files import atomic_dir
from mmnewsrec.metrics import evaluate_scores

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_KIND = "mmnewsrec synthetic MIND data"


@dataclass(frozen=True)
class SynthSummary:
    """Counts and oracle figures of a generated data set."""

    path: str
    news: int
    images: int
    categories: int
    subcategories: int
    users: int  # users with at least one impression
    train_impressions: int
    dev_impressions: int
    candidates: int
    clicks: int
    oracle_auc: float  # dev AUC of the true click probabilities
    visible_auc: float  # dev AUC of the utility without the hidden age and buzz terms
    text_only_auc: float  # ... without the age, buzz and image-style terms
    seconds: float = 0.0

    def __str__(self) -> str:
        return "\n".join(
            [
                f"synthetic MIND data in {self.path}",
                f"  news {self.news:,} ({self.images:,} with images), categories "
                f"{self.categories}, subcategories {self.subcategories}",
                f"  users {self.users:,}, impressions train {self.train_impressions:,} / dev "
                f"{self.dev_impressions:,}, candidates {self.candidates:,}, clicks {self.clicks:,}",
                f"  dev oracle AUC {self.oracle_auc:.4f} (visible signals only "
                f"{self.visible_auc:.4f}, without images {self.text_only_auc:.4f})",
                f"  generated in {self.seconds:.1f} s" if self.seconds else "  (already there)",
            ]
        )


def _write_tsv(frame: pl.DataFrame, path: Path, header: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(
        path, separator="\t", include_header=header, quote_style="never", float_precision=8
    )


def _news_frame(news: News, text: pl.DataFrame, topics: Topics) -> pl.DataFrame:
    ids = "N" + pl.Series("news_id", np.arange(1, len(news.sub) + 1)).cast(pl.String)
    return pl.DataFrame(
        {
            "news_id": ids,
            "category": np.array(topics.categories)[topics.category_of[news.sub]],
            "subcategory": np.array(topics.subcategories)[news.sub],
            "title": text["title"],
            "abstract": text["abstract"],
            "url": "https://news.example/" + ids + ".html",
            "title_entities": "[]",
            "abstract_entities": "[]",
        }
    )


def _joined(group: np.ndarray, n: int, tokens: pl.Expr, frame: dict) -> pl.Series:
    """One space-joined string of tokens per group 0..n-1 ("" for an empty group)."""
    parts = pl.DataFrame({"group": group, **frame}).group_by("group", maintain_order=True)
    joined = parts.agg(tokens.str.join(" ").alias("text"))
    every = pl.DataFrame({"group": np.arange(n, dtype=group.dtype)})
    return every.join(joined, on="group", how="left", maintain_order="left")["text"].fill_null("")


def _history_strings(histories: tuple[np.ndarray, np.ndarray]) -> pl.Series:
    """The MIND history field of every user."""
    offsets, items = histories
    owner = segment_ids(offsets)
    return _joined(owner, len(offsets) - 1, pl.format("N{}", "item"), {"item": items + 1})


def _behaviors_frame(imps: Impressions, history: pl.Series, first: int, last: int) -> pl.DataFrame:
    """Raw MIND behaviors of impressions first..last-1 (one split), ids numbered from 1."""
    bounds = imps.offsets[first : last + 1]
    lo, hi = bounds[0], bounds[-1]
    shown = _joined(
        segment_ids(bounds),
        last - first,
        pl.format("N{}-{}", "item", "label"),
        {"item": imps.items[lo:hi] + 1, "label": imps.labels[lo:hi].astype(np.int8)},
    )
    user = imps.user[first:last]
    return pl.DataFrame(
        {
            "impression_id": np.arange(1, last - first + 1),
            "user_id": "U" + pl.Series(user + 1).cast(pl.String),
            "time": pl.from_epoch(pl.Series(imps.time[first:last]), time_unit="s").dt.strftime(
                "%-m/%-d/%Y %-I:%M:%S %p"
            ),
            "history": history.gather(user),
            "impressions": shown,
        }
    )


def _dev_figures(
    imps: Impressions, users: Users, news: News, model: ClickModel
) -> tuple[pl.DataFrame, dict[str, float]]:
    """The dev oracle table and the dev AUC of the oracle, of visible signals, of text only."""
    lo = imps.offsets[imps.n_train]
    offsets = imps.offsets[imps.n_train :] - lo
    items, labels, z = imps.items[lo:], imps.labels[lo:], imps.utility[lo:]
    user = np.repeat(imps.user[imps.n_train :], np.diff(offsets))
    sub, tier, style = news.sub[items], news.tier[items], news.style[items]
    visible = utility(model, users, all_topics(), user, sub, tier, style)  # no age, buzz
    text_only = utility(model, users, all_topics(), user, sub, tier, np.full_like(style, -1))
    probability = click_probability(z, offsets, model.clicks)
    oracle = pl.DataFrame(
        {
            "impression_id": segment_ids(offsets) + 1,
            "news_id": "N" + pl.Series(items + 1).cast(pl.String),
            "probability": probability,
        }
    )
    figures = {
        name: evaluate_scores(scores, labels, offsets)["auc"]
        for name, scores in [
            ("oracle_auc", probability),
            ("visible_auc", visible),
            ("text_only_auc", text_only),
        ]
    }
    return oracle, figures


def _truth(news: News, users: Users, topics: Topics) -> dict[str, pl.DataFrame]:
    """Hidden attributes of news and users (style: -1 none, 0 stripes, 1 smooth)."""
    names = np.append(np.array(topics.subcategories, dtype=object), "")  # -1 -> ""
    interests = pl.DataFrame(names[users.interests], schema=["a", "b", "c"], orient="row")
    return {
        "news": pl.DataFrame(
            {
                "news_id": "N" + pl.Series(np.arange(1, len(news.sub) + 1)).cast(pl.String),
                "tier": news.tier,
                "style": news.style,
                "published": news.published,
                "buzz": news.buzz,
            }
        ),
        "users": pl.DataFrame(
            {
                "user_id": "U" + pl.Series(np.arange(1, len(users.style) + 1)).cast(pl.String),
                "interests": interests.select(
                    pl.concat_list("a", "b", "c")
                    .list.eval(pl.element().filter(pl.element() != ""))
                    .list.join(",")
                ).to_series(),
                "style": users.style,
            }
        ),
    }


def _write(folder: Path, config: SynthConfig, image_layout: str) -> dict:
    """Simulate and write everything into folder; return the summary fields."""
    topics, model = all_topics(), config.model
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(6)]
    share = rngs[0].dirichlet(np.full(len(topics.subcategories), 8.0))
    news = make_news(rngs[0], config, share)
    users = make_users(rngs[2], config, topics, share)
    histories = draw_histories(rngs[3], model, users, news, topics)
    imps = make_impressions(rngs[4], config, users, news, topics)
    news_frame = _news_frame(news, news_text(rngs[1], news, topics), topics)
    history = _history_strings(histories)
    bounds = {"train": (0, imps.n_train), "dev": (imps.n_train, config.impressions)}
    for split, (first, last) in bounds.items():
        _write_tsv(news_frame, folder / split / "news.tsv")
        _write_tsv(_behaviors_frame(imps, history, first, last), folder / split / "behaviors.tsv")
    oracle, figures = _dev_figures(imps, users, news, model)
    _write_tsv(oracle, folder / "dev" / "oracle.tsv", header=True)
    for name, frame in _truth(news, users, topics).items():
        _write_tsv(frame, folder / "truth" / f"{name}.tsv", header=True)
    started = time.perf_counter()
    if image_layout == "im-mind":
        titles = news_frame["title"].to_list()
        images = write_cards(
            folder / "images", folder / "projector.csv", rngs[5], news, titles, config.image_size
        )
    else:
        images = write_images(folder / "images", rngs[5], news, config.image_size)
    logger.info("wrote %d images in %.1f s", images, time.perf_counter() - started)
    return {
        "news": config.news,
        "images": images,
        "categories": len(np.unique(topics.category_of[news.sub])),
        "subcategories": len(np.unique(news.sub)),
        "users": len(np.unique(imps.user)),
        "train_impressions": imps.n_train,
        "dev_impressions": config.impressions - imps.n_train,
        "candidates": len(imps.items),
        "clicks": int(imps.labels.sum()),
        **{k: round(v, 6) for k, v in figures.items()},
    }


def _config_json(config: SynthConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _saved_manifest(out: Path) -> dict | None:
    """The manifest of the synthetic data set in out, None if out is empty or missing.

    Raises FileExistsError when out holds anything else (a store, real data, ...).
    """
    path = out / "manifest.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("kind") == MANIFEST_KIND:
        return saved
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no synthetic data set")
    return None


def generate(
    out: Path | str, config: SynthConfig | None = None, image_layout: str = "plain"
) -> SynthSummary:
    """Write a synthetic MIND-format data set to out (layout and model: see the module doc).

    `image_layout`: "plain" (images/<news_id>.jpg) or "im-mind" (cards named by a shuffled
    index, and projector.csv; see `mmnewsrec.data.synthetic.images`).

    A data set already in out made with the same configuration is reused; one made with another
    configuration is replaced; any other non-empty folder is an error. Written to a temporary
    folder and renamed, so an interrupted run leaves no half data set.
    """
    config = config or SynthConfig()
    if image_layout not in IMAGE_LAYOUTS:
        raise ValueError(f"image layout must be one of {', '.join(IMAGE_LAYOUTS)}")
    out = Path(out)
    saved = _saved_manifest(out)
    if (
        saved
        and saved["version"] == FORMAT_VERSION
        and saved["config"] == _config_json(config)
        and saved.get("image_layout", "plain") == image_layout
    ):
        logger.info("synthetic data in %s is up to date", out)
        return SynthSummary(path=str(out), **saved["summary"])
    started = time.perf_counter()
    with atomic_dir(out, "a synthetic data set") as tmp:
        fields = _write(tmp, config, image_layout)
        saved = {
            "kind": MANIFEST_KIND,
            "version": FORMAT_VERSION,
            "config": _config_json(config),
            "image_layout": image_layout,
            "summary": fields,
        }
        (tmp / "manifest.json").write_text(json.dumps(saved, indent=2) + "\n")
    return SynthSummary(path=str(out), seconds=time.perf_counter() - started, **fields)
