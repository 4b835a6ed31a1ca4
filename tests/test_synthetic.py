import hashlib
import inspect
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import ClickModel, SynthConfig, click_probability, generate

TIME = re.compile(
    r"^(1[0-2]|[1-9])/([1-9]|[12]\d|3[01])/2019 (1[0-2]|[1-9]):[0-5]\d:[0-5]\d [AP]M$"
)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_tsv(path: Path, names: list[str]) -> pl.DataFrame:
    return pl.read_csv(
        path, separator="\t", has_header=False, new_columns=names, quote_char=None,
        infer_schema=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "quick"
    generate(out, SynthConfig.quick(seed=0))
    return out


@pytest.fixture(scope="module")
def behaviors(data) -> dict[str, pl.DataFrame]:
    names = ["impression_id", "user_id", "time", "history", "impressions"]
    return {split: read_tsv(data / split / "behaviors.tsv", names) for split in ("train", "dev")}


@pytest.fixture(scope="module")
def dev_candidates(data, behaviors) -> pl.DataFrame:
    """Dev candidates in file order with their label and oracle probability."""
    shown = (
        behaviors["dev"]
        .select(pl.col("impression_id").cast(pl.Int64), pl.col("impressions").str.split(" "))
        .explode("impressions")
        .select(
            "impression_id",
            news_id=pl.col("impressions").str.extract(r"^(N\d+)-"),
            label=pl.col("impressions").str.extract(r"-([01])$").cast(pl.Int8),
        )
    )
    oracle = pl.read_csv(data / "dev" / "oracle.tsv", separator="\t")
    assert oracle.columns == ["impression_id", "news_id", "probability"]
    assert oracle.select("impression_id", "news_id").equals(shown.select(oracle.columns[:2]))
    return shown.with_columns(probability=oracle["probability"])


def test_same_seed_gives_identical_bytes_and_another_seed_differs(data, tmp_path):
    generate(tmp_path / "again", SynthConfig.quick(seed=0))
    generate(tmp_path / "other", SynthConfig.quick(seed=1))
    first, again, other = (tree_digest(p) for p in (data, tmp_path / "again", tmp_path / "other"))
    assert first == again
    for name in ["train/news.tsv", "train/behaviors.tsv", "dev/behaviors.tsv"]:
        assert other[name] != first[name]


def test_files_are_raw_mind_format(data, behaviors):
    for split in ("train", "dev"):
        lines = (data / split / "news.tsv").read_text().splitlines()
        fields = [line.split("\t") for line in lines]
        assert {len(f) for f in fields} == {8}
        assert len({f[0] for f in fields}) == len(fields) == SynthConfig.quick().news
        assert all(f[6] == "[]" and f[7] == "[]" and f[5].startswith("https://") for f in fields)
        assert all(len(f[3].split()) >= 4 and f[4].endswith(".") for f in fields)
        rows = (data / split / "behaviors.tsv").read_text().splitlines()
        assert {len(r.split("\t")) for r in rows} == {5}
        b = behaviors[split]
        assert b["time"].str.contains(TIME.pattern).all()
        assert b["impressions"].str.contains(r"^N\d+-[01]( N\d+-[01])*$").all()
        assert b["history"].fill_null("").str.contains(r"^(N\d+( N\d+)*)?$").all()
        assert b["impression_id"].cast(pl.Int64).to_list() == list(range(1, b.height + 1))


def test_impression_and_history_statistics(data, behaviors):
    both = pl.concat([b.with_columns(split=pl.lit(s)) for s, b in behaviors.items()])
    stats = both.select(
        pl.col("impressions").str.count_matches(" ").add(1).alias("candidates"),
        pl.col("impressions").str.count_matches("-1").alias("clicks"),
        pl.col("history").fill_null("").str.count_matches("N").alias("history"),
    )
    assert stats["candidates"].min() >= 5 and stats["candidates"].max() <= 50
    assert stats["candidates"].mean() > 20
    assert set(stats["clicks"].unique()) == {1, 2, 3}
    assert stats["history"].min() == 0 and stats["history"].max() <= 50
    assert 0 < (stats["history"] == 0).mean() < 0.1
    assert behaviors["dev"].height == 400 and behaviors["train"].height == 1600
    times = {
        s: b["time"].str.strptime(pl.Datetime, "%m/%d/%Y %I:%M:%S %p") for s, b in behaviors.items()
    }
    assert times["dev"].min() > times["train"].max()
    # train spans 5 days, so data.valid_split = 'last-day' holds out about a fifth of it
    train_days = times["train"].dt.date()
    assert train_days.n_unique() == 5
    assert 0.1 < (train_days == train_days.max()).mean() < 0.3


def test_topics_and_images(data):
    news = read_tsv(data / "train" / "news.tsv", [f"c{i}" for i in range(8)])
    per_category = news.group_by("c1").agg(pl.col("c2").n_unique())
    assert 8 <= per_category.height <= 15
    assert per_category["c2"].is_between(2, 4).all()
    images = sorted((data / "images").glob("*.jpg"))
    assert 0.4 < len(images) / news.height < 0.6
    with Image.open(images[0]) as image:
        assert image.format == "JPEG" and image.size == (128, 128)
    assert {p.stem for p in images} <= set(news["c0"])


def test_images_show_topic_and_style(data):
    truth = pl.read_csv(data / "truth" / "news.tsv", separator="\t").filter(pl.col("style") >= 0)
    category = dict(read_tsv(data / "train" / "news.tsv", [f"c{i}" for i in range(8)])
                    .select("c0", "c1").iter_rows())  # fmt: skip
    pixels = np.stack(
        [np.asarray(Image.open(data / "images" / f"{n}.jpg"), np.float32) for n in truth["news_id"]]
    )
    # style: stripes make neighbouring pixels differ, smooth backgrounds do not
    edges = sum(np.abs(np.diff(pixels, axis=a)).mean(axis=(1, 2, 3)) for a in (1, 2))
    style = truth["style"].to_numpy()
    assert edges[style == 0].min() > edges[style == 1].max()
    # topic: the mean colour identifies the category (nearest category centroid)
    colour = pixels.mean(axis=(1, 2))
    labels = np.array([category[n] for n in truth["news_id"]])
    names = sorted(set(labels))
    centroids = np.stack([colour[labels == c].mean(axis=0) for c in names])
    nearest = np.argmin(((colour[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (np.array(names)[nearest] == labels).mean() > 0.9


def test_text_tiers_and_topics_are_visible(data):
    news = read_tsv(data / "train" / "news.tsv", [f"c{i}" for i in range(8)])
    truth = pl.read_csv(data / "truth" / "news.tsv", separator="\t")
    prefix = news["c3"].str.extract(r"^(\w+(?: \w+)?): ")
    tier = truth["tier"]
    assert prefix.filter(tier == 0).null_count() == (tier == 0).sum()
    assert prefix.filter(tier != 0).null_count() == 0
    high, low = set(prefix.filter(tier == 1)), set(prefix.filter(tier == -1))
    assert high and low and not high & low
    # every title word outside the filler comes from one subcategory's vocabulary
    words = news.select("c2", pl.col("c3").str.to_lowercase().str.extract_all(r"[a-z]{5,}"))
    owners = words.explode("c3").group_by("c3").agg(pl.col("c2").n_unique())
    assert (owners["c2"] == 1).mean() > 0.8


def test_oracle_agrees_with_labels(data, dev_candidates):
    p = dev_candidates["probability"].to_numpy()
    labels = dev_candidates["label"].to_numpy()
    assert (p > 0).all() and (p < 1).all()
    expected_clicks = np.dot([1, 2, 3], ClickModel().clicks)
    sums = dev_candidates.group_by("impression_id").agg(pl.col("probability").sum())["probability"]
    assert np.allclose(sums, expected_clicks, atol=1e-5)
    assert abs(labels.mean() - p.mean()) < 0.01
    quintile = np.searchsorted(np.quantile(p, [0.2, 0.4, 0.6, 0.8]), p)
    rate = np.array([labels[quintile == q].mean() for q in range(5)])
    assert (np.diff(rate) > 0).all() and rate[4] > 5 * rate[0]
    summary = json.loads((data / "manifest.json").read_text())["summary"]
    assert 0.8 < summary["oracle_auc"] < 0.95
    assert summary["visible_auc"] > summary["text_only_auc"] + 0.01
    assert 0.02 < summary["oracle_auc"] - summary["visible_auc"] < 0.08  # hidden buzz and age


def test_hidden_buzz_and_age_drive_clicks(data, behaviors, dev_candidates):
    """Popularity and freshness matter: news with a high hidden appeal, and fresh news, are
    clicked more often among the candidates shown."""
    truth = pl.read_csv(data / "truth" / "news.tsv", separator="\t")
    times = behaviors["dev"].select(
        pl.col("impression_id").cast(pl.Int64),
        pl.col("time").str.to_datetime("%m/%d/%Y %I:%M:%S %p").dt.epoch("s").alias("t"),
    )
    shown = dev_candidates.join(truth, on="news_id").join(times, on="impression_id")
    label = shown["label"].to_numpy()
    buzz = shown["buzz"].to_numpy()
    age = (shown["t"] - shown["published"]).to_numpy()
    assert label[buzz > 1].mean() > 2 * label[buzz < -1].mean()
    assert label[age < 86_400 / 2].mean() > 1.1 * label[age > 86_400 * 3 / 2].mean()


def test_click_probability_matches_sampling():
    rng = np.random.default_rng(0)
    z = np.array([2.0, 1.0, 0.5, 0.0, 0.0, -1.0, 3.0, 0.3, -0.5, 1.5, 0.0])
    offsets = np.array([0, 6, 11])
    exact = click_probability(z, offsets, (0.5, 0.3, 0.2))
    draws = 100_000
    clicks = rng.choice([1, 2, 3], (draws, 2), p=[0.5, 0.3, 0.2])
    freq = []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        keys = z[a:b] + rng.gumbel(size=(draws, b - a))
        rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
        freq.append((rank < clicks[:, i : i + 1]).mean(axis=0))
    assert np.abs(np.concatenate(freq) - exact).max() < 0.006
    assert np.allclose([exact[:6].sum(), exact[6:].sum()], 0.5 + 0.6 + 0.6)


def test_store_reads_the_data(data, tmp_path):
    store = build_store(data, tmp_path / "store", strict=True)
    assert sorted(store.splits) == ["dev", "train"]
    assert store.num_news == SynthConfig.quick().news
    assert store.news["image_path"].null_count() == store.num_news - len(
        list((data / "images").glob("*.jpg"))
    )
    assert store.behaviors("dev").num_impressions == 400


def test_reuse_replace_and_refuse(tmp_path):
    out = tmp_path / "data"
    generate(out, SynthConfig.quick(seed=3))
    stamp = (out / "dev" / "behaviors.tsv").stat().st_mtime_ns
    assert generate(out, SynthConfig.quick(seed=3)).seconds == 0.0
    assert (out / "dev" / "behaviors.tsv").stat().st_mtime_ns == stamp
    before = tree_digest(out)
    generate(out, SynthConfig.quick(seed=4))
    assert tree_digest(out) != before
    assert not list(tmp_path.glob(".data.*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(other, SynthConfig.quick())
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_defaults_are_the_config_defaults():
    from mmnewsrec.cli import synth

    params = inspect.signature(synth).parameters
    defaults = SynthConfig()
    for name in ("news", "users", "impressions", "seed"):
        assert params[name].default == getattr(defaults, name)


def test_im_mind_layout_gives_the_plain_layouts_images(data, tmp_path):
    """Cards named by a shuffled index; cropped, a card has a photo exactly where the plain
    layout has an image, and the photo is the plain image resized."""
    from mmnewsrec.data.synthetic.images import CARD_SIZE, PHOTO_BOX
    from mmnewsrec.encode.image_files import ImageCrop

    out = tmp_path / "im-mind"
    summary = generate(out, SynthConfig.quick(seed=0), image_layout="im-mind")
    assert generate(out, SynthConfig.quick(seed=0), image_layout="im-mind").seconds == 0.0
    for split in ("train", "dev"):  # only the images differ
        for name in ("news.tsv", "behaviors.tsv"):
            assert (out / split / name).read_bytes() == (data / split / name).read_bytes()
    projector = pl.read_csv(out / "projector.csv")
    assert projector.columns == ["nid", "IM-MIND-INDEX"]
    assert projector["nid"].to_list() == [f"N{i}" for i in range(1, 501)]
    index = projector["IM-MIND-INDEX"].to_numpy()
    assert sorted(index) == list(range(500)) and (index != np.arange(500)).mean() > 0.9
    plain = build_store(data, tmp_path / "plain")
    store = build_store(
        out, tmp_path / "store", images=out / "images", image_map=out / "projector.csv"
    )
    assert store.news["image_path"].null_count() == 0  # every news has a card
    counts = store.manifest["image_map"]
    assert [counts[k] for k in ("duplicate_rows", "unmapped_news", "missing_files")] == [0, 0, 0]
    crop = ImageCrop(PHOTO_BOX)
    has_photo = []
    for path in store.news["image_path"]:
        with Image.open(path) as card:
            assert card.size == CARD_SIZE
            has_photo.append(crop.apply(card) is not None)
    assert has_photo == plain.news["image_path"].is_not_null().to_list()
    assert summary.images == sum(has_photo)
    size = (PHOTO_BOX[2] - PHOTO_BOX[0], PHOTO_BOX[3] - PHOTO_BOX[1])
    rows = np.flatnonzero(has_photo)[:2]
    with Image.open(plain.news["image_path"][int(rows[0])]) as image:
        expected = np.asarray(image.resize(size), dtype=np.float32)
    photos = []
    for row in rows:
        with Image.open(store.news["image_path"][int(row)]) as card:
            photos.append(np.asarray(card.crop(PHOTO_BOX), dtype=np.float32))
    error = [float(np.abs(photo - expected).mean()) for photo in photos]
    assert error[0] < 12 < error[1], error  # the same picture within JPEG artefacts
    with pytest.raises(ValueError, match="image layout"):
        generate(tmp_path / "x", SynthConfig.quick(), image_layout="cards")


def test_cli_image_layout(tmp_path):
    from typer.testing import CliRunner

    from mmnewsrec.cli import app

    args = ["synth", "--out", str(tmp_path / "s"), "--quick", "--image-layout"]
    result = CliRunner().invoke(app, [*args, "cards"])
    assert result.exit_code == 2 and "image layout must be one of plain, im-mind" in result.output
    assert not (tmp_path / "s").exists()
    result = CliRunner().invoke(app, [*args, "im-mind"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "projector.csv").is_file()
