"""The compact store: one news table, per-split behaviors as CSR integer arrays, a manifest.

Layout of STORE_DIR:
    news.parquet               index (1..N; 0 is padding), the 8 MIND news fields, image_path
    users.parquet              user_id, row u <-> user index u
    behaviors/<split>/*.npy    the arrays of `Behaviors` (loaded memory-mapped)
    manifest.json              format version, source sizes and sha256, counts, dropped ids

The store is built in a temporary folder beside STORE_DIR and renamed into place, so a
failed or interrupted build never leaves a partial store and keeps an existing one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from mmnewsrec.data.mind import (
    NEWS_COLUMNS,
    MindFormatError,
    RawBehaviors,
    file_digest,
    find_splits,
    iter_behaviors,
    read_news,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # in order of preference


class StoreError(RuntimeError):
    """A store that cannot be written or read."""


@dataclass
class Behaviors:
    """The impressions of one split as flat arrays with CSR offsets.

    Impression i has history `history_items[history_offsets[i]:history_offsets[i+1]]` and
    candidates `candidate_items[candidate_offsets[i]:candidate_offsets[i+1]]` (news indices,
    0 = padding, never stored) with `candidate_labels` 1/0, or -1 when unlabelled.
    """

    split: str
    labelled: bool
    impression_ids: np.ndarray  # (I,) int64
    user_index: np.ndarray  # (I,) int32
    times: np.ndarray  # (I,) int64 unix seconds
    history_offsets: np.ndarray  # (I+1,) int64
    history_items: np.ndarray  # (H,) int32
    candidate_offsets: np.ndarray  # (I+1,) int64
    candidate_items: np.ndarray  # (C,) int32
    candidate_labels: np.ndarray  # (C,) int8

    def __post_init__(self) -> None:
        for name, dtype in ARRAY_DTYPES.items():
            setattr(self, name, np.asanyarray(getattr(self, name), dtype=dtype))
        n = len(self.impression_ids)
        for kind in ("history", "candidate"):
            offsets, items = getattr(self, f"{kind}_offsets"), getattr(self, f"{kind}_items")
            if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(items):
                raise ValueError(f"{kind}_offsets must be (I+1,) CSR offsets into {kind}_items")
        if not len(self.user_index) == len(self.times) == n:
            raise ValueError("impression_ids, user_index and times must have the same length")
        if len(self.candidate_labels) != len(self.candidate_items):
            raise ValueError("candidate_labels must align with candidate_items")

    @property
    def num_impressions(self) -> int:
        return len(self.impression_ids)

    def history(self, i: int) -> np.ndarray:
        """News indices clicked before impression i, oldest first."""
        return self.history_items[self.history_offsets[i] : self.history_offsets[i + 1]]

    def candidates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(news indices, labels) of impression i's candidates."""
        s = slice(self.candidate_offsets[i], self.candidate_offsets[i + 1])
        return self.candidate_items[s], self.candidate_labels[s]

    def save(self, folder: Path) -> None:
        """Write each array as folder/<name>.npy."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ARRAY_DTYPES:
            np.save(folder / f"{name}.npy", getattr(self, name))

    @classmethod
    def concat(cls, parts: Sequence[Behaviors]) -> Behaviors:
        """The impressions of `parts` one after the other (same split and labelling)."""
        arrays = {
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in ARRAY_DTYPES
            if not name.endswith("_offsets")
        }
        for kind in ("history", "candidate"):
            counts = np.concatenate([np.diff(getattr(p, f"{kind}_offsets")) for p in parts])
            arrays[f"{kind}_offsets"] = csr_offsets(counts)
        return cls(split=parts[0].split, labelled=parts[0].labelled, **arrays)

    @classmethod
    def load(cls, folder: Path, split: str, labelled: bool) -> Behaviors:
        """Memory-map the arrays written by `save`."""
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAY_DTYPES}
        return cls(split=split, labelled=labelled, **arrays)


ARRAY_DTYPES = {
    "impression_ids": np.int64,
    "user_index": np.int32,
    "times": np.int64,
    "history_offsets": np.int64,
    "history_items": np.int32,
    "candidate_offsets": np.int64,
    "candidate_items": np.int32,
    "candidate_labels": np.int8,
}


class Store:
    """A prepared store on disk; arrays are memory-mapped, tables read on first use."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._behaviors: dict[str, Behaviors] = {}

    @classmethod
    def load(cls, path: Path | str) -> Store:
        """Open the store at `path` (written by `build_store`)."""
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"{path}: not a store ({err})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format {manifest.get('format_version')}, expected "
                f"{FORMAT_VERSION}; run `mmnewsrec prepare` again"
            )
        return cls(path, manifest)

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def num_news(self) -> int:
        return self.manifest["num_news"]

    @property
    def num_users(self) -> int:
        return self.manifest["num_users"]

    @cached_property
    def news(self) -> pl.DataFrame:
        """N rows; row r is news index r + 1."""
        return pl.read_parquet(self.path / "news.parquet")

    @cached_property
    def news_ids(self) -> np.ndarray:
        """News id strings by index; [0] is "" (padding)."""
        ids = pl.read_parquet(self.path / "news.parquet", columns=["news_id"])["news_id"]
        return np.concatenate([np.array([""], dtype=object), ids.to_numpy()])

    @cached_property
    def user_ids(self) -> np.ndarray:
        """User id strings by user index."""
        return pl.read_parquet(self.path / "users.parquet")["user_id"].to_numpy()

    def news_index(self, ids: Sequence[str]) -> np.ndarray:
        """News indices (int32) of `ids`; 0 for unknown ids."""
        known = pl.Series(self.news_ids[1:], dtype=pl.String)
        index = pl.int_range(1, len(known) + 1, dtype=pl.Int32, eager=True)
        series = pl.Series(list(ids), dtype=pl.String)
        return series.replace_strict(known, index, default=0, return_dtype=pl.Int32).to_numpy()

    def behaviors(self, split: str) -> Behaviors:
        """The memory-mapped behaviors of `split`."""
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in store {self.path} (has {self.splits})")
        if split not in self._behaviors:
            labelled = self.manifest["splits"][split]["labelled"]
            folder = self.path / "behaviors" / split
            self._behaviors[split] = Behaviors.load(folder, split, labelled)
        return self._behaviors[split]

    def summary(self) -> str:
        """Counts of news, users, impressions, candidates, clicks and dropped ids."""
        m = self.manifest
        lines = [
            f"store {self.path} (content {self.content_hash[:12]})",
            f"news {m['num_news']:,} ({m['num_news_with_image']:,} with image), "
            f"users {m['num_users']:,}",
        ]
        for name, s in m["splits"].items():
            d = s["dropped"]
            clicks = f"{s['clicks']:,}" if s["labelled"] else "unlabelled"
            lines.append(
                f"{name}: impressions {s['impressions']:,}, candidates {s['candidates']:,}, "
                f"clicks {clicks}, history clicks {s['history_items']:,}; dropped: "
                f"{d['unknown_ids']:,} unknown ids ({d['history']:,} in histories, "
                f"{d['candidates']:,} candidates), {d['impressions']:,} empty impressions"
            )
        return "\n".join(lines)


def build_store(
    data_dir: Path | str,
    out: Path | str,
    images: Path | str | None = None,
    strict: bool = False,
    split: str | None = None,
    force: bool = False,
    allow_drops: bool = False,
) -> Store:
    """Read MIND tsv files under `data_dir` and write a store to `out` (atomically).

    A store already in `out` that was built from the same files and options is kept
    (`force` rebuilds it).
    `images` defaults to data_dir/images when present. `strict` makes ids in behaviors
    that are missing from every news.tsv an error; otherwise they are dropped and counted,
    except the candidates of an unlabelled (test) split: a leaderboard file must rank every
    one, so an unknown one is an error unless `allow_drops`.
    `split` names a single-split folder (default "train").
    """
    data_dir, out = Path(data_dir), Path(out)
    folders = find_splits(data_dir, split)
    image_dir = resolve_images(data_dir, images)
    options = {"strict": strict, "allow_drops": allow_drops}
    if not force and is_current(out, folders, image_dir, options):
        logger.info("store up to date: %s", out)
        return Store.load(out)
    news, sources = union_news(folders)
    news, image_digest = attach_images(news, image_dir)
    news_map = NewsMap.build(news)
    manifest = {
        "format_version": FORMAT_VERSION,
        "data_dir": str(data_dir.resolve()),
        "images_dir": str(image_dir) if image_dir else None,
        "images": image_digest,
        **options,
        "num_news": news.height,
        "num_news_with_image": news.height - news["image_path"].null_count(),
        "sources": sources,
        "splits": {},
    }
    with atomic_dir(out) as tmp:
        users = pl.DataFrame(schema={"user_id": pl.String})
        for name, folder in folders.items():
            path = folder / "behaviors.tsv"
            sources.setdefault(name, {})["behaviors"] = file_digest(path)
            behaviors, dropped, users = build_split(name, path, news_map, users, options)
            behaviors.save(tmp / "behaviors" / name)
            manifest["splits"][name] = split_counts(behaviors, dropped)
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


def scan_images(image_dir: Path | None) -> tuple[pl.DataFrame, dict]:
    """(news_id, image_path) of the <news_id>.jpg/.jpeg/.png files in `image_dir`, and a digest
    of the folder's file names and sizes. The images are not opened here."""
    if image_dir is None:
        return pl.DataFrame(schema={"news_id": pl.String, "image_path": pl.String}), {}
    with os.scandir(image_dir) as entries:
        files = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
    names = pl.Series("name", [name for name, _ in files], dtype=pl.String)
    suffix = names.str.extract(r"(\.[^.]+)$").str.to_lowercase()
    rank = suffix.replace_strict(IMAGE_SUFFIXES, range(len(IMAGE_SUFFIXES)), default=None)
    found = (
        pl.DataFrame({"news_id": names.str.replace(r"\.[^.]+$", ""), "name": names, "rank": rank})
        .filter(pl.col("rank").is_not_null())
        .sort("rank", maintain_order=True)
        .unique("news_id", keep="first", maintain_order=True)
    )
    path = (pl.lit(f"{image_dir}{os.sep}") + pl.col("name")).alias("image_path")
    listing = "".join(f"{name}\t{size}\n" for name, size in files)
    digest = {"files": found.height, "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return found.select("news_id", path), digest


def attach_images(news: pl.DataFrame, image_dir: Path | None) -> tuple[pl.DataFrame, dict]:
    """Add `image_path` (absolute path of the news image, or null) to the news table."""
    found, digest = scan_images(image_dir)
    news = news.join(found, on="news_id", how="left", maintain_order="left")
    if image_dir is not None:
        logger.info("images: %d files in %s", found.height, image_dir)
    return news, digest


def is_current(
    out: Path, folders: dict[str, Path], image_dir: Path | None, options: dict[str, bool]
) -> bool:
    """Whether `out` already holds a store of exactly these source files, images and options
    (`strict`, `allow_drops`; a store written before an option existed had it off)."""
    path = out / "manifest.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    sources = {
        name: {
            kind: file_digest(folder / f"{kind}.tsv")
            for kind in ("news", "behaviors")
            if (folder / f"{kind}.tsv").is_file()
        }
        for name, folder in folders.items()
    }
    key = {"sources": sources, "images": scan_images(image_dir)[1]}
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
POWERS_OF_10 = 10 ** np.arange(1, 10)


def mind_numbers(ids: pl.Series) -> np.ndarray:
    """The number of each MIND-style id ("N123" -> 123) as int64; -1 where the id is not N and
    a number without leading zeros or sign."""
    number = ids.str.slice(1).cast(pl.UInt32, strict=False)
    values = number.fill_null(0).to_numpy().astype(np.int64)
    digits = 1 + np.searchsorted(POWERS_OF_10, values, side="right")
    shaped = (ids.str.starts_with("N") & number.is_not_null()).to_numpy()
    canonical = shaped & (ids.str.len_bytes().to_numpy() == 1 + digits)
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


def csr_offsets(counts: np.ndarray) -> np.ndarray:
    """(len(counts)+1,) int64 offsets from per-row counts."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


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
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed.

    An existing `out` is only replaced if it is empty or holds a manifest.json.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise StoreError(f"{out} exists and is not a store; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        logger.info("removing %s left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a store is an ordinary folder
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
