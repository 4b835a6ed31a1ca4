"""The news vectors format: one frozen vector per news index, written by `encode`.

Layout of EMB_DIR:
    vectors.npy     float16 (N+1, dim); row 0 (padding) zeros, row i = news index i of the store
    has_image.npy   bool (N+1,)
    manifest.json   encoders, fields, fusion, dims, store content hash, timings and "hash"
    parts/          the encode stage's cache (see `mmnewsrec.encode.pipeline`)

Files are written under temporary names and renamed; manifest.json goes last, so a folder with
a manifest is always complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmnewsrec.files import temp_path, write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class VectorsError(ValueError):
    """News vectors that cannot be read, or a folder they cannot be written to."""


@dataclass
class NewsVectors:
    """One frozen vector per news index of a store, written by `mmnewsrec encode`
    ([`encode_store`][mmnewsrec.encode.pipeline.encode_store]).

    Row i is news index i of the store the vectors were made from; row 0 is padding (zeros,
    no image). A news item without an image has `has_image` False and, in a concat fusion,
    zeros in the image part.

    Attributes:
        vectors: (N+1, dim) float16, memory-mapped when loaded.
        has_image: (N+1,) bool.
        manifest: The parsed `manifest.json`: encoders and their weights' sha256, text
            fields, fusion and dims, the store's content hash, timings and `hash`.
    """

    vectors: np.ndarray  # (N+1, dim) float16
    has_image: np.ndarray  # (N+1,) bool
    manifest: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.vectors) < 1:
            raise ValueError(f"vectors must be (N+1, dim), got shape {self.vectors.shape}")
        if self.has_image.shape != (len(self.vectors),) or self.has_image.dtype != bool:
            raise ValueError(
                f"has_image must be bool of shape ({len(self.vectors)},), "
                f"got {self.has_image.dtype} {self.has_image.shape}"
            )
        if np.any(self.vectors[0]) or self.has_image[0]:
            raise ValueError("row 0 is padding: its vector must be zeros and has_image False")

    @property
    def dim(self) -> int:
        """The vector width."""
        return int(self.vectors.shape[1])

    @property
    def num_news(self) -> int:
        """N, the number of news items (rows less padding)."""
        return len(self.vectors) - 1

    @property
    def hash(self) -> str:
        """The vectors' content hash; a checkpoint records the hash of the vectors it was
        trained on and refuses others."""
        return self.manifest.get("hash", "")

    def summary(self) -> str:
        """One line: news, width, fusion, news with an image, hash."""
        fusion = self.manifest.get("fusion", {}).get("method", "?")
        image = self.manifest.get("image") or {}
        crop = image.get("crop")
        cropped = f" (cropped {crop['box']}; {image['blank_crops']:,} blank)" if crop else ""
        return (
            f"{self.num_news:,} news x {self.dim} ({fusion}), "
            f"{int(self.has_image.sum()):,} with an image{cropped}, hash {self.hash[:12]}"
        )

    @classmethod
    def load(cls, path: Path | str) -> NewsVectors:
        """Open a vectors folder (EMB_DIR), the vectors memory-mapped.

        Raises:
            VectorsError: The folder holds no complete vectors, or arrays that do not match
                its manifest.
        """
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            vectors = np.load(path / "vectors.npy", mmap_mode="r")
            has_image = np.load(path / "has_image.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise VectorsError(f"{path}: no complete news vectors ({err}); run `encode`") from None
        expected = (manifest.get("num_news", -2) + 1, manifest.get("dim"))
        if vectors.shape != expected:
            raise VectorsError(
                f"{path}: vectors.npy {vectors.shape} does not match manifest.json "
                f"(num_news + 1, dim) = {expected}"
            )
        return cls(vectors, has_image, manifest)

    def save(self, path: Path | str) -> None:
        """Write to a vectors folder, atomically: manifest.json last, so a folder with a
        manifest is complete."""
        path = prepare_out(Path(path))
        temp = {name: temp_path(path / name) for name in ("vectors.npy", "has_image.npy")}
        save_npy(temp["vectors.npy"], np.asarray(self.vectors, dtype=np.float16))
        save_npy(temp["has_image.npy"], np.asarray(self.has_image, dtype=bool))
        manifest = {**self.manifest, "num_news": self.num_news, "dim": self.dim}
        commit(path, temp, manifest)


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to exactly `path` (np.save itself appends .npy to other names)."""
    with path.open("wb") as handle:
        np.save(handle, array)


def prepare_out(out: Path) -> Path:
    """Create EMB_DIR, clear temporary files of interrupted runs; refuse a foreign folder."""
    if out.is_dir() and any(out.iterdir()):
        ours = (out / "manifest.json").is_file() or (out / "parts").is_dir()
        if not ours:
            raise VectorsError(f"{out} exists and does not hold news vectors; refusing to write")
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".*.tmp-*"), *(out / "parts").glob(".*.tmp-*")]:
        logger.info("removing %s left by an interrupted run", stale)
        stale.unlink()
    return out


def commit(out: Path, temp: dict[str, Path], manifest: dict) -> None:
    """Rename the written files into place; the manifest disappears first and returns last."""
    (out / "manifest.json").unlink(missing_ok=True)
    for name, path in temp.items():
        os.replace(path, out / name)
    write_json(out / "manifest.json", manifest)
