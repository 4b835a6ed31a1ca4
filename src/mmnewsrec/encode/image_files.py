"""Image files into vectors, for every image encoder (`ImageFileEncoder` is their base).

A thread pool reads and preprocesses the files a few batches ahead of the model. A missing image
(None) or an unreadable file gives a zero row and `has_image` False; unreadable files are
counted and listed in a warning.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from mmnewsrec.devices import effective_precision, inference, resolve_device
from mmnewsrec.encode.base import dedupe, to_numpy

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

PREFETCH = 2  # batches read ahead of the model
SHOWN_UNREADABLE = 20  # unreadable files named in the warning

Preprocess = Callable[["Image.Image"], np.ndarray]  # an opened image file -> model input
Embed = Callable[["torch.Tensor"], "torch.Tensor"]


def read_image(path: str, preprocess: Preprocess) -> np.ndarray | None:
    """Open an image file and preprocess it (which decodes it); None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return preprocess(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        logger.debug("cannot read image %s: %s", path, err)
        return None


def read_batches(
    paths: Sequence[str], preprocess: Preprocess, batch_size: int
) -> Iterator[list[np.ndarray | None]]:
    """Preprocessed images batch by batch, read by threads up to PREFETCH batches ahead."""

    def collect(futures: list[Future]) -> list[np.ndarray | None]:
        return [future.result() for future in futures]

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        pending: deque[list[Future]] = deque()
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            pending.append([pool.submit(read_image, path, preprocess) for path in batch])
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
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 rows and (n,) has_image; each distinct file is embedded once."""
    import torch
    from tqdm.auto import tqdm

    unique, inverse = dedupe(paths)
    todo = [i for i, path in enumerate(unique) if path]
    files = [path for path in unique if path]
    vectors = np.zeros((len(unique), dim), dtype=np.float32)
    ok = np.zeros(len(unique), dtype=bool)
    resolved = resolve_device(device)
    batches = read_batches(files, preprocess, batch_size)
    bar = tqdm(total=len(todo), desc=desc, unit="img", leave=False, disable=len(todo) < 256)
    with bar, inference(resolved, effective_precision(resolved, precision)):
        for start, arrays in zip(range(0, len(todo), batch_size), batches, strict=True):
            rows = [todo[start + k] for k, array in enumerate(arrays) if array is not None]
            if rows:
                pixels = np.stack([a for a in arrays if a is not None])
                if resolved.type == "cuda":  # one batch shape: no per-shape kernel selection
                    pixels = np.resize(pixels, (batch_size, *pixels.shape[1:]))
                batch = torch.from_numpy(pixels).to(resolved, non_blocking=True)
                vectors[rows] = to_numpy(embed(batch))[: len(rows)]
                ok[rows] = True
            bar.update(len(arrays))
    warn_unreadable([path for i, path in zip(todo, files, strict=True) if not ok[i]])
    return vectors[inverse], ok[inverse]


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
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 rows and (n,) has_image; each distinct file is embedded once."""
        self.model.to(resolve_device(device))
        return encode_image_files(
            items, self.preprocess, self.embed, self.dim, batch_size, device, precision
        )


class ProcessorImageEncoder(ImageFileEncoder):
    """An image encoder whose inputs come from a Hugging Face image processor (`processor`)."""

    processor: Any

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One image -> (C, H, W) float32."""
        return self.processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
