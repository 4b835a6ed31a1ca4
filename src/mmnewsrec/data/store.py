"""Prepare: MIND tsv files into the compact store (the format: `mmnewsrec.formats.store`).

The store is built in a temporary folder beside STORE_DIR and renamed into place, so a
failed or interrupted build never leaves a partial store and keeps an existing one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mmnewsrec.csr import csr_offsets
from mmnewsrec.data.mind import (
    NEWS_COLUMNS,
    MindFormatError,
    RawBehaviors,
    file_digest,
    find_splits,
    iter_behaviors,
    read_news,
)
from mmnewsrec.data.signals import SIGNALS_VERSION, build_signals
from mmnewsrec.files import atomic_dir, sha256_json
from mmnewsrec.formats.store import FORMAT_VERSION, Behaviors, Store, StoreError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # in order of preference
IMAGE_MAP_COLUMNS = ("nid", "IM-MIND-INDEX")  # news id and image file stem in IM-MIND's map
MIN_IMAGE_MATCH = 0.01  # an image folder naming fewer news ids than this share gets a warning


def build_store(
    data_dir: Path | str,
    out: Path | str,
    images: Path | str | None = None,
    strict: bool = False,
    split: str | None = None,
    force: bool = False,
    allow_drops: bool = False,
    image_map: Path | str | None = None,
    image_map_columns: tuple[str, str] = IMAGE_MAP_COLUMNS,
) -> Store:
    """Read the MIND tsv files under `data_dir` and write a store to `out`, atomically: what
    `mmnewsrec prepare` does. Every line is validated; the first bad one stops it with a
    [`MindFormatError`][mmnewsrec.data.mind.MindFormatError] naming file, line and field.

    A store already in `out` that was built from the same files and options is kept as it is.

    Args:
        data_dir: A folder with `train/`, `dev/` (and `test/`) sub-folders, each holding
            `behaviors.tsv` and `news.tsv`, or one split's folder (see `split`).
        out: The store folder to write.
        images: Folder of `<news_id>.jpg|png` (or of the files `image_map` names); default
            `data_dir/images` when present.
        strict: Make ids in behaviors that no news.tsv lists an error; otherwise they are
            dropped and counted, except the candidates of an unlabelled (test) split: a
            leaderboard file must rank every one, so an unknown one is an error there unless
            `allow_drops`.
        split: The name of a single-split `data_dir` (default "train").
        force: Rebuild even if the store is up to date.
        allow_drops: Drop and count unknown candidates of an unlabelled split instead.
        image_map: A CSV giving each news id its image file stem (IM-MIND's projector.csv);
            its duplicate rows, unmapped news and missing files are counted in the manifest.
        image_map_columns: The map's news id and file stem columns.

    Returns:
        The written (or kept) store.

    Raises:
        MindFormatError: A malformed input file.
        StoreError: The store cannot be written.
    """
    data_dir, out = Path(data_dir), Path(out)
    folders = find_splits(data_dir, split)
    image_dir = resolve_images(data_dir, images)
    check_image_map(image_dir, image_map)
    image_sources = ImageSources(image_dir, image_map, image_map_columns)
    options = {"strict": strict, "allow_drops": allow_drops}
    if not force and is_current(out, folders, image_sources, options):
        logger.info("store up to date: %s", out)
        return Store.load(out)
    news, sources = union_news(folders)
    news, image_digest, map_counts = attach_images(news, image_sources)
    news_map = NewsMap.build(news)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "data_dir": str(data_dir.resolve()),
        "images_dir": str(image_dir) if image_dir else None,
        "images": image_digest,
        "image_map": map_counts,
        **options,
        "num_news": news.height,
        "num_news_with_image": news.height - news["image_path"].null_count(),
        "sources": sources,
        "splits": {},
    }
    with atomic_dir(out, "a store", StoreError) as tmp:
        users = pl.DataFrame(schema={"user_id": pl.String})
        splits = {}
        for name, folder in folders.items():
            path = folder / "behaviors.tsv"
            sources.setdefault(name, {})["behaviors"] = file_digest(path)
            behaviors, dropped, users = build_split(name, path, news_map, users, options)
            behaviors.save(tmp / "behaviors" / name)
            manifest["splits"][name] = split_counts(behaviors, dropped)
            splits[name] = behaviors
        manifest["signals"] = build_signals(splits, news.height, tmp / "signals")
        news.drop("line").write_parquet(tmp / "news.parquet")
        users.write_parquet(tmp / "users.parquet")
        manifest["num_users"] = users.height
        manifest["content_hash"] = content_hash(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    store = Store.load(out)
    logger.info("store written to %s", out)
    return store


def union_news(folders: dict[str, Path]) -> tuple[pl.DataFrame, dict]:
    """All splits' news.tsv as one table (first occurrence wins), with `index` 1..N."""
    tables, sources = [], {}
    for name, folder in folders.items():
        path = folder / "news.tsv"
        if not path.is_file():
            logger.warning("split %s has no news.tsv", name)
            continue
        sources[name] = {"news": file_digest(path)}
        tables.append(read_news(path))
        logger.info("read %s: %d news", path, tables[-1].height)
    if not tables:
        raise MindFormatError(next(iter(folders.values())) / "news.tsv", None, None, "missing")
    news = pl.concat(tables).unique("news_id", keep="first", maintain_order=True)
    index = pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("index")
    return news.select(index, *NEWS_COLUMNS, "line"), sources


def resolve_images(data_dir: Path, images: Path | str | None) -> Path | None:
    """The image folder: `images` if given (must exist), else data_dir/images if present."""
    if images is not None:
        if not Path(images).is_dir():
            raise MindFormatError(images, None, None, "image folder not found")
        return Path(images).resolve()
    default = data_dir / "images"
    return default.resolve() if default.is_dir() else None


def check_image_map(image_dir: Path | None, image_map: Path | str | None) -> None:
    """An image map must be a file and come with an image folder."""
    if image_map is None:
        return
    if not Path(image_map).is_file():
        raise MindFormatError(image_map, None, None, "image map not found")
    if image_dir is None:
        raise MindFormatError(image_map, None, None, "an image map needs an image folder")


@dataclass(frozen=True)
class ImageSources:
    """Where the news images are: a folder, and optionally a CSV mapping news id -> file stem."""

    folder: Path | None
    map_path: Path | str | None
    map_columns: tuple[str, str]

    def scan(self) -> tuple[pl.DataFrame, dict]:
        """(stem, image_path) of the image files, and a digest of the folder and the map."""
        found, digest = scan_images(self.folder)
        if self.map_path is not None:
            map_digest = file_digest(Path(self.map_path))["sha256"]
            digest = {**digest, "map": {"sha256": map_digest, "columns": list(self.map_columns)}}
        return found, digest


def scan_images(image_dir: Path | None) -> tuple[pl.DataFrame, dict]:
    """(stem, image_path) of the .jpg/.jpeg/.png files in `image_dir` (one per stem, in that
    order of preference), and a digest of the folder's file names and sizes. The images are
    not opened here."""
    if image_dir is None:
        return pl.DataFrame(schema={"stem": pl.String, "image_path": pl.String}), {}
    with os.scandir(image_dir) as entries:
        files = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
    names = pl.Series("name", [name for name, _ in files], dtype=pl.String)
    suffix = names.str.extract(r"(\.[^.]+)$").str.to_lowercase()
    rank = suffix.replace_strict(IMAGE_SUFFIXES, range(len(IMAGE_SUFFIXES)), default=None)
    found = (
        pl.DataFrame({"stem": names.str.replace(r"\.[^.]+$", ""), "name": names, "rank": rank})
        .filter(pl.col("rank").is_not_null())
        .sort("rank", maintain_order=True)
        .unique("stem", keep="first", maintain_order=True)
    )
    path = (pl.lit(f"{image_dir}{os.sep}") + pl.col("name")).alias("image_path")
    listing = "".join(f"{name}\t{size}\n" for name, size in files)
    digest = {"files": found.height, "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return found.select("stem", path), digest


def read_image_map(path: Path, columns: tuple[str, str]) -> pl.DataFrame:
    """The image map CSV as (news_id, stem, line); an image value may carry its file suffix."""
    try:
        table = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise MindFormatError(path, None, None, f"cannot read the image map: {err}") from err
    for column in columns:
        if column not in table.columns:
            header = ", ".join(table.columns)
            raise MindFormatError(path, 1, column, f"column missing (the header has {header})")
    nid, image = columns
    suffixes = "|".join(re.escape(suffix) for suffix in IMAGE_SUFFIXES)
    table = table.select(
        pl.col(nid).str.strip_chars().alias("news_id"),
        pl.col(image).str.strip_chars().str.replace(f"(?i)({suffixes})$", "").alias("stem"),
        pl.int_range(2, pl.len() + 2, dtype=pl.Int64).alias("line"),  # line 1 is the header
    )
    for column, field in (("news_id", nid), ("stem", image)):
        empty = table.filter(pl.col(column).fill_null("") == "")
        if empty.height:
            raise MindFormatError(path, int(empty["line"][0]), field, "empty value")
    return table


def map_images(
    news: pl.DataFrame, found: pl.DataFrame, path: Path, columns: tuple[str, str]
) -> tuple[pl.DataFrame, dict]:
    """(news_id, image_path) through the image map (first row of a news id wins), and counts
    of what the map could not give: duplicate rows, unmapped news, missing files."""
    table = read_image_map(path, columns)
    first = table.unique("news_id", keep="first", maintain_order=True)
    stems = table.unique(["news_id", "stem"]).group_by("news_id").len()
    in_store = first.join(news.select("news_id"), on="news_id", how="semi")
    mapped = in_store.join(found, on="stem", how="left")
    counts = {
        "path": str(Path(path).resolve()),
        "columns": list(columns),
        "rows": table.height,
        "duplicate_rows": table.height - first.height,
        "conflicting_ids": int((stems["len"] > 1).sum()),
        "unknown_news": first.height - in_store.height,
        "unmapped_news": news.height - in_store.height,
        "missing_files": mapped["image_path"].null_count(),
    }
    if counts["duplicate_rows"] or counts["unmapped_news"] or counts["missing_files"]:
        logger.warning(
            "%s: %d duplicate rows (%d news ids with different images; first row kept), "
            "%d news without a row, %d mapped files missing",
            path,
            counts["duplicate_rows"],
            counts["conflicting_ids"],
            counts["unmapped_news"],
            counts["missing_files"],
        )
    return mapped.select("news_id", "image_path"), counts


def attach_images(
    news: pl.DataFrame, sources: ImageSources
) -> tuple[pl.DataFrame, dict, dict | None]:
    """Add `image_path` (absolute path of the news image, or null) to the news table; also
    the image digest and the image map's counts (None without a map)."""
    found, digest = sources.scan()
    counts = None
    if sources.map_path is not None:
        found, counts = map_images(news, found, Path(sources.map_path), sources.map_columns)
    else:
        found = found.rename({"stem": "news_id"})
    news = news.join(found, on="news_id", how="left", maintain_order="left")
    if sources.folder is not None:
        logger.info("images: %d files in %s", digest["files"], sources.folder)
        if sources.map_path is None:
            warn_unmatched_images(news, sources.folder, digest["files"])
    return news, digest, counts


def warn_unmatched_images(news: pl.DataFrame, folder: Path, files: int) -> None:
    """Warn when the image files of a folder name (almost) none of the news ids: such files
    are named by something else, as IM-MIND's cards are (by an index, through projector.csv)."""
    matched = news.height - news["image_path"].null_count()
    if files and matched < MIN_IMAGE_MATCH * news.height:
        logger.warning(
            "%s: only %d of %d news ids (%.1f%%) name one of its %d image files; an IM-MIND "
            "folder names its cards by index and needs its projector.csv as the image map "
            "(prepare --image-map, or image_map in an experiment file)",
            folder, matched, news.height, 100 * matched / news.height, files,
        )  # fmt: skip


def is_current(
    out: Path, folders: dict[str, Path], images: ImageSources, options: dict[str, bool]
) -> bool:
    """Whether `out` already holds a store of exactly these source files, images and options
    (`strict`, `allow_drops`; a store written before an option existed had it off), with
    behaviour signals of the current version."""
    path = out / "manifest.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    if manifest.get("signals", {}).get("version") != SIGNALS_VERSION:
        return False
    sources = {
        name: {
            kind: file_digest(folder / f"{kind}.tsv")
            for kind in ("news", "behaviors")
            if (folder / f"{kind}.tsv").is_file()
        }
        for name, folder in folders.items()
    }
    key = {"sources": sources, "images": images.scan()[1]}
    same_options = all(manifest.get(name, False) == value for name, value in options.items())
    return same_options and manifest["content_hash"] == content_hash(key)


def build_split(
    split: str, path: Path, news_map: NewsMap, users: pl.DataFrame, options: dict[str, bool]
) -> tuple[Behaviors, dict, pl.DataFrame]:
    """Parse one behaviors.tsv chunk by chunk into Behaviors; returns dropped counts and users.

    `users` (one user_id column, row = user index) is extended with the split's new users, in
    order of first appearance, once the whole file is read. `options` are build_store's
    `strict` and `allow_drops`.
    """
    parts, unknown, dropped = [], [], dict.fromkeys(["history", "candidates", "impressions"], 0)
    seen, kept = [users], []  # user ids of every impression, of the impressions kept
    for raw in iter_behaviors(path):
        part, kept_users, ids, counts = index_behaviors(raw, split, news_map, **options)
        parts.append(part)
        seen.append(raw.rows.select("user_id"))
        kept.append(kept_users)
        unknown.append(ids)
        dropped = {key: dropped[key] + counts[key] for key in dropped}
    dropped["unknown_ids"] = pl.concat(unknown).n_unique()
    if dropped["unknown_ids"]:
        logger.warning(
            "%s: %d news ids not in any news.tsv: dropped %d history clicks, %d candidates "
            "and %d impressions left without candidates",
            path,
            dropped["unknown_ids"],
            dropped["history"],
            dropped["candidates"],
            dropped["impressions"],
        )
    logger.info("read %s: %d impressions", path, sum(p.num_impressions for p in parts))
    users = pl.concat(seen).unique(maintain_order=True)
    behaviors = Behaviors.concat(parts)
    behaviors.user_index = (
        pl.DataFrame({"user_id": pl.concat(kept)})
        .join(users.with_row_index("u"), on="user_id", how="left", maintain_order="left")["u"]
        .to_numpy()
        .astype(np.int32)
    )
    return behaviors, dropped, users


def index_behaviors(
    raw: RawBehaviors,
    split: str,
    news_map: NewsMap,
    strict: bool = False,
    allow_drops: bool = False,
) -> tuple[Behaviors, pl.Series, pl.Series, dict]:
    """Map news ids to indices, drop (or, if strict, reject) unknown news ids.

    Unknown candidates of unlabelled impressions are rejected unless `allow_drops`.
    Returns the Behaviors (user_index 0: users are indexed per split by `build_split`), the user
    ids of the impressions kept, the unknown news ids (with repeats) and counts of what was
    dropped.
    """
    history = news_map.lookup(raw.history["news_id"])
    candidates = news_map.lookup(raw.candidates["news_id"])
    if strict:
        reject_unknown(raw, raw.history, history, "history", STRICT_HINT)
        reject_unknown(raw, raw.candidates, candidates, "impressions", STRICT_HINT)
    elif not raw.labelled and not allow_drops:
        reject_unknown(raw, raw.candidates, candidates, "impressions", UNLABELLED_HINT)
    history_rows = raw.history["row"].to_numpy() - raw.first_row
    candidate_rows = raw.candidates["row"].to_numpy() - raw.first_row
    n = raw.rows.height
    known = candidates > 0
    keep = np.bincount(candidate_rows[known], minlength=n) > 0  # impressions left with candidates
    history_kept = (history > 0) & keep[history_rows]
    behaviors = Behaviors(
        split=split,
        labelled=raw.labelled,
        impression_ids=raw.rows["impression_id"].to_numpy()[keep],
        user_index=np.zeros(int(keep.sum())),
        times=raw.rows["time"].to_numpy()[keep],
        history_offsets=csr_offsets(np.bincount(history_rows[history_kept], minlength=n)[keep]),
        history_items=history[history_kept],
        candidate_offsets=csr_offsets(np.bincount(candidate_rows[known], minlength=n)[keep]),
        candidate_items=candidates[known],
        candidate_labels=raw.candidates["label"].to_numpy()[known],
    )
    unknown = pl.concat(
        [
            raw.history["news_id"].filter(pl.Series(history == 0)),
            raw.candidates["news_id"].filter(pl.Series(~known)),
        ]
    )
    counts = {
        "history": int((history == 0).sum()),
        "candidates": int((~known).sum()),
        "impressions": int(n - keep.sum()),
    }
    return behaviors, raw.rows["user_id"].filter(pl.Series(keep)), unknown, counts


@dataclass
class NewsMap:
    """News id -> news index. MIND ids (N and a number without leading zeros, as N55528) are
    looked up by number in a table, which is faster than hashing strings; other ids by a join."""

    ids: pl.DataFrame  # news_id, index
    by_number: np.ndarray | None  # (max number + 1,) int32 index, 0 = none; None: not MIND ids

    @classmethod
    def build(cls, news: pl.DataFrame) -> NewsMap:
        """The map of a news table with `news_id` and `index` columns (ids unique)."""
        ids = news.select("news_id", "index")
        numbers = mind_numbers(ids["news_id"])
        if len(numbers) == 0 or numbers.min() < 0 or numbers.max() >= MAX_ID_NUMBER:
            return cls(ids, None)
        by_number = np.zeros(numbers.max() + 1, dtype=np.int32)
        by_number[numbers] = ids["index"].to_numpy()
        return cls(ids, by_number)

    def lookup(self, news_ids: pl.Series) -> np.ndarray:
        """News index (int32) of each id; 0 where the id is in no news.tsv."""
        if self.by_number is None:
            found = news_ids.to_frame("news_id").join(
                self.ids, on="news_id", how="left", maintain_order="left"
            )
            return found["index"].fill_null(0).cast(pl.Int32).to_numpy()
        numbers = mind_numbers(news_ids)
        known = (numbers >= 0) & (numbers < len(self.by_number))
        return np.where(known, self.by_number[np.where(known, numbers, 0)], 0).astype(np.int32)


MAX_ID_NUMBER = 1 << 24  # largest number of a MIND id looked up by table (64 MiB)
# the numbers an id of L bytes (N and L - 1 digits) can write without a leading zero:
# LOWEST[L] <= number < LOWEST[L + 1], for L up to 12 (a uint32 has at most 10 digits)
LOWEST = np.array([0, 0, 0, *(10 ** np.arange(1, 12))])


def mind_numbers(ids: pl.Series) -> np.ndarray:
    """The number of each MIND-style id ("N123" -> 123) as int64; -1 where the id is not N and
    a number without leading zeros or sign."""
    number = ids.str.slice(1).cast(pl.UInt32, strict=False)
    values = number.fill_null(0).to_numpy().astype(np.int64)
    shaped = (ids.str.starts_with("N") & number.is_not_null()).to_numpy()
    size = np.minimum(ids.str.len_bytes().to_numpy(), len(LOWEST) - 2)
    canonical = shaped & (LOWEST[size] <= values) & (values < LOWEST[size + 1])
    return np.where(canonical, values, -1)


STRICT_HINT = "without --strict they are dropped"
UNLABELLED_HINT = (
    "an unlabelled (test) split keeps every candidate, as a leaderboard file ranks them all; "
    "--allow-drops drops them"
)


def reject_unknown(
    raw: RawBehaviors, tokens: pl.DataFrame, index: np.ndarray, field: str, hint: str
) -> None:
    """Raise for the first token whose news id is in no news.tsv; `hint` says what else to do."""
    unknown = index == 0
    if unknown.any():
        first = int(np.argmax(unknown))
        distinct = tokens["news_id"].filter(pl.Series(unknown)).n_unique()
        raise MindFormatError(
            raw.path,
            int(tokens["row"][first]) + 1,
            field,
            f"news id {tokens['news_id'][first]!r} is in no news.tsv ({distinct} unknown ids "
            f"in this field; {hint})",
        )


def split_counts(b: Behaviors, dropped: dict) -> dict:
    """Manifest entry of one split."""
    return {
        "labelled": b.labelled,
        "impressions": b.num_impressions,
        "users": int(len(np.unique(b.user_index))),
        "candidates": len(b.candidate_items),
        "clicks": int((b.candidate_labels == 1).sum()),
        "history_items": len(b.history_items),
        "dropped": dropped,
    }


def content_hash(manifest: dict) -> str:
    """sha256 over the format version, the source file hashes and the image listing."""
    sources = {
        split: {kind: d["sha256"] for kind, d in files.items()}
        for split, files in manifest["sources"].items()
    }
    key = {"format_version": FORMAT_VERSION, "sources": sources, "images": manifest["images"]}
    return sha256_json(key)
