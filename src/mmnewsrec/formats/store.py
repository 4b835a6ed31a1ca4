"""The store format: one news table, per-split behaviors as CSR integer arrays, a manifest.

Layout of STORE_DIR (written by `mmnewsrec.data.store.build_store`):
    news.parquet               index (1..N; 0 is padding), the 8 MIND news fields, image_path
    users.parquet              user_id, row u <-> user index u
    behaviors/<split>/*.npy    the arrays of `Behaviors` (loaded memory-mapped)
    signals/<split>.npy        (C, 5) float32 behaviour signals per candidate, columns
                               SIGNAL_NAMES (see `mmnewsrec.data.signals`; memory-mapped)
    manifest.json              format version, source sizes and sha256, counts, dropped ids,
                               `signals` (names, the train split they count clicks in, version)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from mmnewsrec.csr import csr_offsets, segment_ids

FORMAT_VERSION = 1
# Columns of signals/<split>.npy, computed at impression time by `mmnewsrec.data.signals`.
NEVER = np.iinfo(np.int64).max  # the first appearance of a news item absent from the logs
DAY = 86_400  # seconds: impression times are unix seconds
SIGNAL_NAMES = ("popularity", "exposures", "freshness", "coclick", "history_len")


class StoreError(RuntimeError):
    """A store that cannot be written or read."""


@dataclass
class Behaviors:
    """The impressions of one split as flat arrays with CSR offsets.

    Impression i has history `history_items[history_offsets[i]:history_offsets[i+1]]` and
    candidates `candidate_items[candidate_offsets[i]:candidate_offsets[i+1]]` (news indices,
    0 = padding, never stored) with `candidate_labels` 1/0, or -1 when unlabelled.
    Opened by [`Store.behaviors`][mmnewsrec.formats.store.Store.behaviors], memory-mapped.

    Attributes:
        split: The split's name (`train`, `dev`, `test` or a subset's name).
        labelled: Whether the candidates carry click labels (a test split does not).
        impression_ids: (I,) int64, the impression ids of behaviors.tsv.
        user_index: (I,) int32, rows of the store's `users.parquet`.
        times: (I,) int64, impression times in unix seconds (UTC).
        history_offsets: (I+1,) int64 CSR offsets into `history_items`.
        history_items: (H,) int32 news indices clicked before each impression, oldest first.
        candidate_offsets: (I+1,) int64 CSR offsets into `candidate_items`.
        candidate_items: (C,) int32 news indices shown, in the file's order.
        candidate_labels: (C,) int8, 1 clicked, 0 not, -1 unlabelled.
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
        """I, the number of impressions."""
        return len(self.impression_ids)

    def history(self, i: int) -> np.ndarray:
        """News indices clicked before impression i, oldest first."""
        return self.history_items[self.history_offsets[i] : self.history_offsets[i + 1]]

    def candidates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(news indices, labels) of impression i's candidates."""
        s = slice(self.candidate_offsets[i], self.candidate_offsets[i + 1])
        return self.candidate_items[s], self.candidate_labels[s]

    def item_times(self, kind: str = "candidate") -> np.ndarray:
        """(nnz,) the impression time of each candidate (kind "candidate") or history click
        (kind "history"), in the order of the CSR items."""
        return np.asarray(self.times)[segment_ids(getattr(self, f"{kind}_offsets"))]

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

    def subset(self, keep: np.ndarray, split: str) -> Behaviors:
        """The impressions where the (I,) bool mask `keep` is true, in order, named `split`."""
        arrays = {
            name: np.asarray(getattr(self, name))[keep]
            for name in ("impression_ids", "user_index", "times")
        }
        for kind in ("history", "candidate"):
            sizes = np.diff(getattr(self, f"{kind}_offsets"))
            in_kept = np.repeat(keep, sizes)
            arrays[f"{kind}_offsets"] = csr_offsets(sizes[keep])
            arrays[f"{kind}_items"] = np.asarray(getattr(self, f"{kind}_items"))[in_kept]
            if kind == "candidate":
                arrays["candidate_labels"] = np.asarray(self.candidate_labels)[in_kept]
        return Behaviors(split=split, labelled=self.labelled, **arrays)

    @classmethod
    def load(cls, folder: Path, split: str, labelled: bool) -> Behaviors:
        """Memory-map the arrays written by `save`."""
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAY_DTYPES}
        return cls(split=split, labelled=labelled, **arrays)


def first_appearance(logs: Iterable[Behaviors], num_news: int) -> np.ndarray:
    """(N+1,) int64: the earliest impression time at which each news index appears in `logs`,
    as a candidate or in a history; NEVER for a news item in no log."""
    first = np.full(num_news + 1, NEVER, dtype=np.int64)
    for b in logs:
        for kind in ("candidate", "history"):
            np.minimum.at(first, np.asarray(getattr(b, f"{kind}_items")), b.item_times(kind))
    return first


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
    """A prepared store on disk, written by [`build_store`][mmnewsrec.data.store.build_store]
    (`mmnewsrec prepare`): the news table, the users, each split's behaviors and behaviour
    signals. Arrays are memory-mapped and tables read on first use, so opening a store costs
    nothing however large it is.

    News are numbered 1..N in the order of `news.parquet` (0 is padding); every array of the
    store and of the news vectors uses these indices.

    Example:
        ```text
        store = Store.load("store/mind-small")
        dev = store.behaviors("dev")
        clicked = store.news_ids[dev.history(0)]
        ```

    Attributes:
        path: The store folder.
        manifest: The parsed `manifest.json`: format version, sources, options, counts per
            split, dropped ids, signals and `content_hash`.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._behaviors: dict[str, Behaviors] = {}

    @classmethod
    def load(cls, path: Path | str) -> Store:
        """Open the store at `path`.

        Raises:
            StoreError: `path` holds no store, or one of another format version.
        """
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
        """sha256 of what the store was built from; vectors and runs record it."""
        return self.manifest["content_hash"]

    @property
    def splits(self) -> list[str]:
        """The split names, e.g. `["train", "dev"]`."""
        return list(self.manifest["splits"])

    @property
    def num_news(self) -> int:
        """N, the number of news items."""
        return self.manifest["num_news"]

    @property
    def num_users(self) -> int:
        """The number of users over all splits."""
        return self.manifest["num_users"]

    @cached_property
    def news(self) -> pl.DataFrame:
        """The news table, N rows: row r is news index r + 1. Columns: the eight MIND news
        fields and `image_path` (null without an image)."""
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
        """The memory-mapped behaviors of `split`.

        Raises:
            KeyError: The store has no such split (the message names those it has).
        """
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in store {self.path} (has {self.splits})")
        if split not in self._behaviors:
            labelled = self.manifest["splits"][split]["labelled"]
            folder = self.path / "behaviors" / split
            self._behaviors[split] = Behaviors.load(folder, split, labelled)
        return self._behaviors[split]

    def signals(self, split: str, names: Sequence[str] | None = None) -> np.ndarray:
        """The behaviour signals of `split`'s candidates.

        Args:
            split: A split of the store.
            names: Signals to return, in this order (see `SIGNAL_NAMES`); None for all.

        Returns:
            (C, len(SIGNAL_NAMES)) float32, aligned with the split's `candidate_items`,
                memory-mapped; given `names`, (C, len(names)) read into memory.

        Raises:
            StoreError: The store was written before the signals; `prepare` it again.
        """
        self.behaviors(split)  # a KeyError naming the splits if there is no such split
        path = self.path / "signals" / f"{split}.npy"
        if "signals" not in self.manifest or not path.is_file():
            raise StoreError(
                f"{self.path} has no behaviour signals (written by an older version); "
                "run `mmnewsrec prepare` again"
            )
        table = np.load(path, mmap_mode="r")
        if names is None:
            return table
        return np.ascontiguousarray(table[:, [SIGNAL_NAMES.index(name) for name in names]])

    def summary(self) -> str:
        """Counts of news, users, impressions, candidates, clicks and dropped ids."""
        m = self.manifest
        lines = [
            f"store {self.path} (content {self.content_hash[:12]})",
            f"news {m['num_news']:,} ({m['num_news_with_image']:,} with image), "
            f"users {m['num_users']:,}",
        ]
        if image_map := m.get("image_map"):
            lines.append(
                f"image map {image_map['path']}: {image_map['rows']:,} rows, "
                f"{image_map['duplicate_rows']:,} duplicate rows "
                f"({image_map['conflicting_ids']:,} ids with different images), "
                f"{image_map['unmapped_news']:,} news without a row, "
                f"{image_map['missing_files']:,} mapped files missing"
            )
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
