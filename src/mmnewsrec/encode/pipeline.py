"""Embed every news item of a store once with frozen encoders and keep the vectors on disk.

The layout of EMB_DIR is `mmnewsrec.formats.vectors`; parts/ holds the text part and the image
part, each keyed by its own model and inputs (text: model, fields, the texts; image: model,
size, crop, the files). Several EMB_DIRs may share one parts folder (`parts_dir`): vectors
that fuse the same text part with different image parts then encode the text once.

"hash" is a sha256 over what determines the vectors (store content, encoder identities, text
fields, image files, fusion, precision), not over timings. A run whose hash matches the
manifest does no model work. The parts make a new fusion or new text fields re-run only what
changed, and let an interrupted run resume. Files are written under temporary names and
renamed; manifest.json goes last, so a folder with a manifest is always complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmnewsrec.devices import PRECISIONS, check_device, effective_precision, resolve_device
from mmnewsrec.encode.base import ImageEncoder, TextEncoder, model_identity
from mmnewsrec.encode.fusion import FUSIONS, Fusion
from mmnewsrec.encode.image import DEFAULT_IMAGE_ENCODER, efficientnet_weights
from mmnewsrec.encode.image_files import BLANK_STD, ImageCrop
from mmnewsrec.encode.text import DEFAULT_TEXT_ENCODER, text_model_path
from mmnewsrec.files import atomic_file, sha256_json, temp_path, write_text
from mmnewsrec.formats.vectors import (
    FORMAT_VERSION,
    NewsVectors,
    VectorsError,
    commit,
    prepare_out,
    save_npy,
)

if TYPE_CHECKING:
    import polars as pl
    import torch

    from mmnewsrec.encode.joint import JointEncoder
    from mmnewsrec.formats.store import Store

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("title", "abstract", "category", "subcategory")
DEFAULT_FIELDS = ("category", "subcategory", "title")
FIELD_SEPARATOR = ". "
FUSE_ROWS = 65_536  # rows fused per chunk (bounded memory)
NONE = "none"


class EncodeError(ValueError):
    """Bad encode options."""


@dataclass(frozen=True)
class EncodeConfig:
    """Options of `encode_store`.

    text_encoder / image_encoder: hub id or local path; None = the default
    (all-MiniLM-L6-v2; EfficientNet-Lite0 when the store has images), "none" = off.
    joint_encoder: a CLIP or BLIP model giving both sides (then leave the other two unset).
    fusion: concat | hadamard | mean | text | image; None = concat with both sides, else the
    side present.
    image_crop: a box cut from each image first (IM-MIND's cover photo: 15, 15, 215, 180);
    a crop whose grey levels have a standard deviation <= image_blank_std means no image.
    """

    text_encoder: str | None = None
    text_fields: tuple[str, ...] = DEFAULT_FIELDS
    image_encoder: str | None = None
    image_size: int | None = None
    joint_encoder: str | None = None
    fusion: str | None = None
    fusion_dim: int | None = None
    seed: int = 0
    batch_size: int | None = None  # None: 64 on CPU, 256 on GPU
    device: str = "auto"
    precision: str = "auto"
    image_crop: tuple[int, int, int, int] | None = None  # left, top, right, bottom
    image_blank_std: float = BLANK_STD

    def __post_init__(self) -> None:
        unknown = [f for f in self.text_fields if f not in TEXT_FIELDS]
        if unknown or not self.text_fields:
            raise EncodeError(
                f"text fields must be a non-empty subset of {', '.join(TEXT_FIELDS)}; "
                f"got {', '.join(self.text_fields) or 'none'}"
            )
        if self.joint_encoder and self.text_encoder not in (None, NONE):
            raise EncodeError("a joint encoder gives the text side; do not set a text encoder")
        if self.joint_encoder and self.image_encoder not in (None, NONE):
            raise EncodeError("a joint encoder gives the image side; do not set an image encoder")
        if self.image_size is not None and (
            self.joint_encoder or self.image_encoder not in (None, DEFAULT_IMAGE_ENCODER)
        ):
            raise EncodeError(f"an image size applies to {DEFAULT_IMAGE_ENCODER} only")
        if self.fusion is not None and self.fusion not in FUSIONS:
            raise EncodeError(f"fusion must be one of {', '.join(FUSIONS)}, not {self.fusion!r}")
        try:
            check_device(self.device)
        except ValueError as err:
            raise EncodeError(str(err)) from None
        if self.precision not in PRECISIONS:
            raise EncodeError(f"precision must be one of {', '.join(PRECISIONS)}")
        if (self.batch_size is not None and self.batch_size < 1) or (
            self.image_size is not None and self.image_size < 32
        ):
            raise EncodeError("batch size must be positive and an image size at least 32")
        try:
            self.crop()
        except ValueError as err:
            raise EncodeError(f"image crop: {err}") from None

    def crop(self) -> ImageCrop | None:
        """The image crop, or None for whole images."""
        if self.image_crop is None:
            return None
        return ImageCrop(self.image_crop, self.image_blank_std)


def news_texts(news: pl.DataFrame, fields: Sequence[str]) -> pl.Series:
    """One string per news: its non-empty fields, in the given order, joined by '. '."""
    import polars as pl

    parts = [
        pl.when(pl.col(f).str.strip_chars() != "").then(pl.col(f).str.strip_chars()) for f in fields
    ]
    text = pl.concat_str(parts, separator=FIELD_SEPARATOR, ignore_nulls=True).fill_null("")
    return news.select(text.alias("text"))["text"]


def image_listing(paths: pl.Series) -> str:
    """sha256 over the image paths with each file's size and modification time."""
    digest = hashlib.sha256()
    for path in paths.to_list():
        stat = os.stat(path) if path and os.path.exists(path) else None
        digest.update(f"{path}\t{stat and stat.st_size}\t{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class Encoders:
    """The configured encoders, loaded on first use (a cache hit loads none)."""

    def __init__(self, text: str | None, image: str | None, config: EncodeConfig):
        self.text_name, self.image_name, self.config = text, image, config

    @cached_property
    def joint(self) -> JointEncoder:
        from mmnewsrec.encode.joint import load_joint_encoder

        assert self.config.joint_encoder is not None
        return load_joint_encoder(self.config.joint_encoder)

    @cached_property
    def text(self) -> TextEncoder:
        if self.config.joint_encoder:
            return self.joint.text_side()
        from mmnewsrec.encode.text import SentenceEncoder

        assert self.text_name is not None
        return SentenceEncoder(self.text_name)

    @cached_property
    def image(self) -> ImageEncoder:
        if self.config.joint_encoder:
            return self.joint.image_side()
        from mmnewsrec.encode.image import load_image_encoder

        assert self.image_name is not None
        return load_image_encoder(self.image_name, self.config.image_size)

    @cached_property
    def joint_identity(self) -> dict:
        assert self.config.joint_encoder is not None
        return {**model_identity(self.config.joint_encoder), "joint": True}

    def identity(self, side: str) -> dict:
        """The model identity recorded for a side (the joint model for both sides)."""
        if self.config.joint_encoder:
            return self.joint_identity
        name = self.text_name if side == "text" else self.image_name
        assert name is not None
        if side == "text":
            return model_identity(name, text_model_path(name))
        if name == DEFAULT_IMAGE_ENCODER:
            weights = efficientnet_weights()
            image_size = self.config.image_size or 224
            return {**model_identity(name, weights), "image_size": image_size}
        return model_identity(name)


def choose_encoders(config: EncodeConfig, store: Store) -> tuple[str | None, str | None]:
    """(text model, image model); None for a side that is off. Fills in the defaults."""
    has_images = store.news["image_path"].null_count() < store.num_news
    joint = config.joint_encoder
    text = side_model(config.text_encoder, joint or DEFAULT_TEXT_ENCODER, True)
    image = side_model(config.image_encoder, joint or DEFAULT_IMAGE_ENCODER, has_images)
    if not has_images and config.image_encoder is None:
        logger.info("the store has no images: encoding text only")
    elif not has_images and image:
        logger.warning("the store has no images: the image part will be all zeros")
    if text is None and image is None:
        raise EncodeError("both text and image encoders are off: nothing to encode")
    return text, image


def side_model(option: str | None, default: str, default_on: bool) -> str | None:
    """The model of one side: off for "none", the default (if on) for None, else as given."""
    if option == NONE:
        return None
    if option is None:
        return default if default_on else None
    return option


def encode_store(
    store_dir: Path | str,
    out: Path | str,
    config: EncodeConfig | None = None,
    *,
    force: bool = False,
    parts_dir: Path | str | None = None,
) -> NewsVectors:
    """Embed every news item of a store into a vectors folder: what `mmnewsrec encode` does.

    With unchanged inputs and options there is no model work: the existing vectors are
    returned.

    Args:
        store_dir: The store written by `prepare`.
        out: The vectors folder to write.
        config: Encoders, text fields, fusion, device (default: MiniLM, and
            EfficientNet-Lite0 when the store has images, concatenated).
        force: Encode everything again, cached parts included.
        parts_dir: The cache of text and image parts (default `out/parts`, where the parts
            the new vectors do not use are deleted); a folder shared by several outputs is
            never pruned.

    Returns:
        The vectors, memory-mapped from `out`.
    """
    from mmnewsrec.formats.store import Store

    started = time.perf_counter()
    config = config or EncodeConfig()
    store, out = Store.load(store_dir), Path(out)
    text_name, image_name = choose_encoders(config, store)
    encoders = Encoders(text_name, image_name, config)
    device = resolve_device(config.device)
    precision = effective_precision(device, config.precision)
    plan = Plan(store, encoders, config, device, precision, reuse_parts=not force)
    if not force and plan.is_current(out):
        logger.info("vectors up to date: %s (hash %s)", out, plan.hash[:12])
        return NewsVectors.load(out)
    prepare_out(out)
    parts = out / "parts" if parts_dir is None else Path(parts_dir)
    timings: dict[str, float] = {}
    text = plan.text_part(parts, str(device), timings)
    image, has_image = plan.image_part(parts, str(device), timings)
    fusion = Fusion(
        plan.fusion_method(),
        text_dim=text.shape[1] if text is not None else 0,
        image_dim=image.shape[1] if image is not None else 0,
        dim=config.fusion_dim,
        seed=config.seed,
    )
    t0 = time.perf_counter()
    temp = write_vectors(out, text, image, has_image, fusion)
    timings["fusion_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    manifest = plan.manifest(fusion, has_image, str(device), timings)
    commit(out, temp, manifest)
    if parts_dir is None:
        prune_parts(parts, keep={plan.text_key, plan.image_key})
    logger.info(
        "wrote %s: %d news x %d (%.1f s)", out, store.num_news, fusion.out_dim, timings["total_s"]
    )
    return NewsVectors.load(out)


class Plan:
    """What one encode run computes: the part keys, the overall hash, the parts themselves."""

    def __init__(
        self,
        store: Store,
        encoders: Encoders,
        config: EncodeConfig,
        device: torch.device,
        precision: str,
        reuse_parts: bool = True,
    ):
        self.store, self.encoders, self.config, self.precision = store, encoders, config, precision
        self.reuse_parts = reuse_parts
        self.batch_size = config.batch_size or (256 if device.type == "cuda" else 64)
        self.texts = news_texts(store.news, config.text_fields) if encoders.text_name else None
        self.paths = store.news["image_path"] if encoders.image_name else None
        self.text_info = self.side_info("text") if encoders.text_name else None
        self.image_info = self.side_info("image") if encoders.image_name else None
        try:  # check the fusion against the sides now, before any model work
            Fusion(
                self.fusion_method(), bool(self.text_info), bool(self.image_info), config.fusion_dim
            )
        except ValueError as err:
            raise EncodeError(str(err)) from None
        self.hash = sha256_json(
            {
                "format_version": FORMAT_VERSION,
                "store": store.content_hash,
                "text": self.text_key,
                "image": self.image_key,
                "fusion": [self.fusion_method(), config.fusion_dim, config.seed],
            }
        )

    def side_info(self, side: str) -> dict:
        """Encoder identity, inputs and the part key of one side."""
        info: dict[str, Any] = {"encoder": self.encoders.identity(side)}
        if side == "text":
            assert self.texts is not None
            info["fields"] = list(self.config.text_fields)
            inputs = hashlib.sha256("\0".join(self.texts.to_list()).encode()).hexdigest()
        else:
            assert self.paths is not None
            inputs = image_listing(self.paths)
            crop = self.config.crop()
            info["crop"] = crop.describe() if crop else None
        key = {**info, "precision": self.precision, "inputs": inputs}
        info["key"] = f"{side}-{sha256_json(key)[:20]}"
        return info

    @property
    def text_key(self) -> str | None:
        return self.text_info["key"] if self.text_info else None

    @property
    def image_key(self) -> str | None:
        return self.image_info["key"] if self.image_info else None

    def fusion_method(self) -> str:
        if self.config.fusion:
            return self.config.fusion
        if self.text_info and self.image_info:
            return "concat"
        return "text" if self.text_info else "image"

    def is_current(self, out: Path) -> bool:
        try:
            return NewsVectors.load(out).hash == self.hash
        except VectorsError:
            return False

    def text_part(self, parts: Path, device: str, timings: dict) -> np.ndarray | None:
        """(N, dt) float16 (memory-mapped), from the cache or the text encoder."""
        if self.text_info is None or self.texts is None:
            return None
        series = self.texts

        def compute() -> tuple[dict[str, np.ndarray], dict]:
            encoder = self.encoders.text
            texts = series.to_list()
            logger.info("encoding %d texts with %s on %s", len(texts), encoder.name, device)
            vectors = encoder.encode(texts, self.batch_size, device, self.precision)
            return {"vectors": vectors}, {"dim": encoder.dim}

        reuse = self.reuse_parts
        key = self.text_info["key"]
        arrays, meta = cached_part(parts, key, compute, reuse, timings, "text_s")
        self.text_info.update(meta)
        return arrays["vectors"]

    def image_part(
        self, parts: Path, device: str, timings: dict
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(N, di) float16 (memory-mapped) and (N,) has_image, from the cache or the encoder."""
        if self.image_info is None or self.paths is None:
            return None, np.zeros(self.store.num_news, dtype=bool)
        paths = self.paths

        def compute() -> tuple[dict[str, np.ndarray], dict]:
            import polars as pl

            encoder = self.encoders.image
            todo = len(paths) - paths.null_count()
            logger.info("encoding %d images with %s on %s", todo, encoder.name, device)
            vectors, has_image, blank = encoder.encode(
                paths.to_list(), self.batch_size, device, self.precision, self.config.crop()
            )
            missed = paths.is_not_null() & ~pl.Series(has_image) & ~pl.Series(blank)
            unreadable = paths.filter(missed).unique()
            meta = {
                "dim": encoder.dim,
                "unreadable": unreadable.sort().to_list(),
                "blank_crops": int(blank.sum()),
            }
            return {"vectors": vectors, "has_image": has_image}, meta

        arrays, meta = cached_part(
            parts, self.image_info["key"], compute, self.reuse_parts, timings, "image_s"
        )
        self.image_info.update(meta)
        return arrays["vectors"], np.asarray(arrays["has_image"])

    def manifest(self, fusion: Fusion, has_image: np.ndarray, device: str, timings: dict) -> dict:
        import torch
        import transformers

        return {
            "format_version": FORMAT_VERSION,
            "hash": self.hash,
            "num_news": self.store.num_news,
            "dim": fusion.out_dim,
            "dtype": "float16",
            "num_with_image": int(has_image.sum()),
            "store": {
                "path": str(self.store.path.resolve()),
                "content_hash": self.store.content_hash,
            },
            "text": self.text_info,
            "image": self.image_info,
            "fusion": fusion.describe(),
            "precision": self.precision,
            "device": device,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def cached_part(
    parts: Path,
    key: str,
    compute: Callable[[], tuple[dict[str, np.ndarray], dict]],
    reuse: bool,
    timings: dict,
    timing: str,
) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays (float16 / bool, memory-mapped) and info of one part: from parts/ if there, else
    computed and saved (arrays first, then KEY.json, which marks the part complete)."""
    meta_path = parts / f"{key}.json"
    cached = reuse and meta_path.is_file()
    if cached:
        logger.info("reusing cached %s", key)
    else:
        t0 = time.perf_counter()
        arrays, info = compute()
        timings[timing] = time.perf_counter() - t0
        for name, array in arrays.items():
            with atomic_file(parts / f"{key}.{name}.npy") as tmp:
                save_npy(tmp, array.astype(np.float16) if array.dtype.kind == "f" else array)
        write_text(meta_path, json.dumps({"arrays": list(arrays), "info": info}))
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.load(parts / f"{key}.{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, {**meta["info"], "cached": cached}


def write_vectors(
    out: Path,
    text: np.ndarray | None,
    image: np.ndarray | None,
    has_image: np.ndarray,
    fusion: Fusion,
) -> dict[str, Path]:
    """Fuse the parts chunk by chunk into temporary vectors.npy / has_image.npy."""
    n = len(has_image)
    temp = {name: temp_path(out / name) for name in ("vectors.npy", "has_image.npy")}
    vectors = np.lib.format.open_memmap(
        temp["vectors.npy"], mode="w+", dtype=np.float16, shape=(n + 1, fusion.out_dim)
    )
    vectors[0] = 0
    for start in range(0, n, FUSE_ROWS):
        rows = slice(start, start + FUSE_ROWS)
        t = None if text is None else np.asarray(text[rows], dtype=np.float32)
        i = None if image is None else np.asarray(image[rows], dtype=np.float32)
        vectors[1 + start : 1 + start + len(has_image[rows])] = fusion(t, i, has_image[rows])
    vectors.flush()
    del vectors
    save_npy(temp["has_image.npy"], np.concatenate([[False], has_image]))
    return temp


def prune_parts(parts: Path, keep: set[str | None]) -> None:
    """Delete cached parts that the current vectors do not use (bounded disk use)."""
    for path in parts.iterdir():
        if path.name.split(".")[0] not in keep:
            path.unlink()
