"""News vectors for news that arrive while serving: the text model the run's vectors came from.

A fine-tuned run encodes with its own encoder, RUN_DIR/text_encoder (the constant dimensions
its manifest lists pinned to their values, as in RUN_DIR/vectors); any other run with the text
model its vectors' manifest names. The text is the manifest's fields joined as `encode` joins
them, and the fusion is the manifest's, applied to a news item without an image (whose image
part is then what `encode` gives such a news). Images are not encoded here: vectors with an
image part refuse a new item that has one; joint (CLIP, BLIP) and image-only vectors refuse
every new item.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mmnewsrec.encode.text import SentenceEncoder
    from mmnewsrec.formats.vectors import NewsVectors

logger = logging.getLogger(__name__)


class NotEncodable(ValueError):
    """A new news item (or any, for these vectors) that the server cannot encode."""


@dataclass(frozen=True)
class NewNews:
    """A news item added while serving (the store's news columns; no image file)."""

    news_id: str
    title: str
    abstract: str = ""
    category: str = ""
    subcategory: str = ""
    url: str = ""


class NewsItemEncoder:
    """One news vector (D,) float32, rounded to float16 as stored vectors are, per new item."""

    def __init__(self, run_dir: Path, vectors: NewsVectors, source: str) -> None:
        """run_dir: the run (a fine-tuned one keeps its text encoder there); vectors: the news
        vectors it was trained on; source: their manifest file, named in errors."""
        from mmnewsrec.encode.fusion import Fusion
        from mmnewsrec.encode.text import SentenceEncoder

        manifest = vectors.manifest
        text, fusion = manifest.get("text") or {}, manifest.get("fusion") or {}
        encoder = text.get("encoder") or {}
        if not encoder or encoder.get("joint") or fusion.get("method") == "image":
            raise NotEncodable(
                f"the run's news vectors ({manifest.get('hash', '?')[:12]}) have no separate "
                "text-model part that the server could compute for a new news item"
            )
        self.fusion = Fusion.from_manifest(fusion, source)  # before a model loads
        if "fields" not in text or "id" not in encoder:
            raise ValueError(f'{source}: the "text" entry needs "fields" and "encoder": {{"id"}}')
        self.fields: list[str] = list(text["fields"])
        self.reads_images = bool(manifest.get("image"))
        self.constant: dict[str, list] = {"dims": [], "values": []}
        name = encoder["id"]
        if "finetuned" in manifest:
            name = str(run_dir / "text_encoder")
            saved = json.loads((run_dir / "text_encoder" / "manifest.json").read_text())
            self.constant = saved.get("constant_dims", self.constant)
        self.model: SentenceEncoder = SentenceEncoder(name)
        logger.info("new news encoded by %s (fields %s)", name, self.fields)

    def encode(self, news: NewNews, has_image: bool = False) -> np.ndarray:
        """The vector of `news`; `has_image`: the item comes with an image (refused when the
        vectors have an image part, which the server cannot compute)."""
        import polars as pl

        from mmnewsrec.encode.pipeline import news_texts

        if has_image and self.reads_images:
            raise NotEncodable(
                "the run's news vectors have an image part, which the server does not compute; "
                "send the item without an image (its image part is then that of a news without one)"
            )
        row = pl.DataFrame({field: [getattr(news, field)] for field in self.fields})
        text = self.model.encode(news_texts(row, self.fields).to_list())  # (1, text_dim)
        text[:, self.constant["dims"]] = self.constant["values"]
        image = np.zeros((1, self.fusion.image_dim), dtype=np.float32)
        vector = self.fusion(text, image, np.zeros(1, dtype=bool))[0]
        return vector.astype(np.float16).astype(np.float32)
