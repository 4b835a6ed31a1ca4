"""Image files into vectors, for every image encoder (`ImageFileEncoder` is their base).

A thread pool reads and preprocesses the files a few batches ahead of the model. A missing image
(None) or an unreadable file gives a zero row and `has_image` False; unreadable files are
counted and listed in a warning. An `ImageCrop` cuts a box from each image first (IM-MIND's
cover photo); a blank crop (near-constant pixels: a text-only card) also means no image.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

from mmnewsrec.devices import effective_precision, inference, resolve_device
from mmnewsrec.encode.base import dedupe, to_numpy

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

PREFETCH = 2  # batches read ahead of the model
SHOWN_UNREADABLE = 20  # unreadable files named in the warning
BLANK_STD = 2.0  # a crop whose grey levels (0-255) have at most this standard deviation is blank

Preprocess = Callable[["Image.Image"], np.ndarray]  # an opened image file -> model input
Embed = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class ImageCrop:
    """A box (left, top, right, bottom, in pixels) cut from each image before the encoder's
    preprocessing; a crop whose grey levels have a standard deviation <= `blank_std` is blank."""

    box: tuple[int, int, int, int]
    blank_std: float = BLANK_STD

    def __post_init__(self) -> None:
        left, top, right, bottom = self.box
        if left < 0 or top < 0 or right <= left or bottom <= top:
            raise ValueError(f"need 0 <= left < right and 0 <= top < bottom, got {self.box}")
        if self.blank_std < 0:
            raise ValueError(f"the blank threshold must be >= 0, not {self.blank_std}")

    def apply(self, image: Image.Image) -> Image.Image | None:
        """The cropped image, or None if the crop is blank; ValueError if the box does not fit."""
        width, height = image.size
        if self.box[2] > width or self.box[3] > height:
            raise ValueError(f"crop box {self.box} outside the {width} x {height} image")
        cropped = image.crop(self.box)
        if float(np.asarray(cropped.convert("L"), dtype=np.float32).std()) <= self.blank_std:
            return None
        return cropped

    def describe(self) -> dict:
        return {"box": list(self.box), "blank_std": self.blank_std}


# a preprocessed image, or why there is none
Read: TypeAlias = np.ndarray | Literal["unreadable", "blank"]


def read_image(path: str, preprocess: Preprocess, crop: ImageCrop | None = None) -> Read:
    """Open an image file, crop it if asked and preprocess it (which decodes it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if crop is None:
                return preprocess(image)
            cropped = crop.apply(image)
            return "blank" if cropped is None else preprocess(cropped)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        logger.debug("cannot read image %s: %s", path, err)
        return "unreadable"


def read_batches(
    paths: Sequence[str], preprocess: Preprocess, batch_size: int, crop: ImageCrop | None = None
) -> Iterator[list[Read]]:
    """Preprocessed images batch by batch, read by threads up to PREFETCH batches ahead."""

    def collect(futures: list[Future]) -> list[Read]:
        return [future.result() for future in futures]

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        pending: deque[list[Future]] = deque()
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            pending.append([pool.submit(read_image, path, preprocess, crop) for path in batch])
            if len(pending) > PREFETCH:
                yield collect(pending.popleft())
        while pending:
            yield collect(pending.popleft())


def encode_image_files(
    paths: Sequence[str | None],
    preprocess: Preprocess,
    embed: Embed,
    dim: int,
    batch_size: int = 64,
    device: str = "cpu",
    precision: str = "auto",
    desc: str = "images",
    crop: ImageCrop | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, dim) float32 rows, (n,) has_image and (n,) blank (the crop was blank); each distinct
    file is embedded once."""
    import torch
    from tqdm.auto import tqdm

    unique, inverse = dedupe(paths)
    todo = [i for i, path in enumerate(unique) if path]
    files = [path for path in unique if path]
    vectors = np.zeros((len(unique), dim), dtype=np.float32)
    ok = np.zeros(len(unique), dtype=bool)
    blank = np.zeros(len(unique), dtype=bool)
    resolved = resolve_device(device)
    batches = read_batches(files, preprocess, batch_size, crop)
    bar = tqdm(total=len(todo), desc=desc, unit="img", leave=False, disable=len(todo) < 256)
    with bar, inference(resolved, effective_precision(resolved, precision)):
        for start, arrays in zip(range(0, len(todo), batch_size), batches, strict=True):
            kinds = ["image" if isinstance(a, np.ndarray) else a for a in arrays]
            rows = [todo[start + k] for k, kind in enumerate(kinds) if kind == "image"]
            blank[[todo[start + k] for k, kind in enumerate(kinds) if kind == "blank"]] = True
            if rows:
                pixels = np.stack([a for a in arrays if isinstance(a, np.ndarray)])
                if resolved.type == "cuda":  # one batch shape: no per-shape kernel selection
                    pixels = np.resize(pixels, (batch_size, *pixels.shape[1:]))
                batch = torch.from_numpy(pixels).to(resolved, non_blocking=True)
                vectors[rows] = to_numpy(embed(batch))[: len(rows)]
                ok[rows] = True
            bar.update(len(arrays))
    warn_unreadable([path for i, path in zip(todo, files, strict=True) if not (ok[i] or blank[i])])
    if blank.any():
        logger.info("%d image(s) blank where cropped: no image", int(blank.sum()))
    return vectors[inverse], ok[inverse], blank[inverse]


def warn_unreadable(paths: list[str]) -> None:
    """One warning naming the image files that could not be read (they count as missing)."""
    if not paths:
        return
    shown = ", ".join(paths[:SHOWN_UNREADABLE])
    more = f" and {len(paths) - SHOWN_UNREADABLE} more" if len(paths) > SHOWN_UNREADABLE else ""
    logger.warning(
        "%d image file(s) could not be read and count as missing: %s%s", len(paths), shown, more
    )


class ImageFileEncoder:
    """Base of the image encoders: `encode` reads image files and embeds them batch by batch.

    Subclasses set `name`, `dim` and `model` (a torch module) and define `preprocess` (an opened
    image -> model input) and `embed` (a batch of inputs -> (B, dim) vectors).
    """

    name: str
    dim: int
    model: Any

    def preprocess(self, image: Image.Image) -> np.ndarray:
        raise NotImplementedError

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(
        self,
        items: Sequence[str | None],
        batch_size: int = 64,
        device: str = "cpu",
        precision: str = "auto",
        crop: ImageCrop | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, dim) float32 rows, (n,) has_image and (n,) blank crop; each distinct file is
        embedded once."""
        self.model.to(resolve_device(device))
        return encode_image_files(
            items, self.preprocess, self.embed, self.dim, batch_size, device, precision, crop=crop
        )


class ProcessorImageEncoder(ImageFileEncoder):
    """An image encoder whose inputs come from a Hugging Face image processor (`processor`)."""

    processor: Any

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One image -> (C, H, W) float32."""
        return self.processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
